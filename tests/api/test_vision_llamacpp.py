"""A GGUF vision model on llama.cpp (engine/backends/llamacpp_vision.py) against the real server: a
tiny random llama GGUF with a LLaVA-1.5 projector (``mmproj``) beside it in its folder, built here
(tests/support/gguf_mmproj.py), asked through the OpenAI and Anthropic SDKs with base64 PNGs.

The greedy answer equals a direct run of llama-cpp-python's own libmtmd in this process (the same
files, the same rendered prompt, the same pixels); usage counts the image's 16 tokens, as /tokenize
does; another image gives other log-probabilities (prefix reuse keys images by their hash); a text
request to the same model decodes in the same batch while an image request runs; a corrupt image
is a 400 and the server goes on; the mmproj file is no model of its own; a text-only GGUF given an
image stays a 400 ``model_not_supported``.
"""

from __future__ import annotations

import base64
import ctypes
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.support.gguf_mmproj import IMAGE_SIZE, IMAGE_TOKENS, build_tiny_llava
from tests.support.images import QUESTION, data_url, image_message, png
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")

pytestmark = pytest.mark.server

VLM = "tiny-llava"
UNLOADED = "tiny-llava-unloaded"  # the same pair, never loaded: listed as a vision model from its files
TEXT = "tiny-text"  # the same text model without its projector
EOS = "2"  # <|im_end|> in SmolLM2's tokenizer: biased away where an answer must run its full length


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import TEST_MODELS_DIR

    model, mmproj = build_tiny_llava(TEST_MODELS_DIR / "llamacpp-vision" / VLM, default_model_folder())
    folder = tmp_path_factory.mktemp("vision-gguf")
    for name in (VLM, UNLOADED):
        (folder / name).mkdir()
        for source in (model, mmproj):
            os.link(source, folder / name / source.name)
    (folder / TEXT).mkdir()
    os.link(model, folder / TEXT / model.name)
    os.link(mmproj, folder / mmproj.name)  # a projector alone at the top level: never a model
    return folder


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("vision-gguf-server"),
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_DEFAULT_MODEL=VLM,
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_LLAMACPP_THREADS="1",
        IMPETUS_MAX_BATCH="4",
    )
    yield srv
    stop_server(srv, wait=False)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def reference(models: Path, prompt: str, image: bytes, max_tokens: int) -> tuple[list[int], int]:
    """llama-cpp-python's libmtmd run directly (as its MTMDChatHandler drives it): ``prompt`` and the
    image's RGB pixels tokenized, evaluated into sequence 0, then greedy tokens. Returns (the
    tokens, the prompt's token count)."""
    import llama_cpp as lc
    import llama_cpp.mtmd_cpp as mt
    import numpy as np
    from PIL import Image

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(
        str(models / VLM / "tiny-llava-f32.gguf").encode(), lc.llama_model_default_params()
    )
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads, params.n_threads_batch = 512, 512, 512, 1, 1
    ctx = lc.llama_init_from_model(model, params)
    mparams = mt.mtmd_context_params_default()
    mparams.n_threads, mparams.print_timings = 1, False
    mctx = mt.mtmd_init_from_file(str(models / VLM / "mmproj-tiny-llava-f32.gguf").encode(), model, mparams)
    pixels = Image.open(io.BytesIO(image)).convert("RGB")
    raw = pixels.tobytes()
    bitmap = mt.mtmd_bitmap_init(pixels.width, pixels.height, (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw))
    chunks = mt.mtmd_input_chunks_init()
    text = mt.mtmd_input_text()
    encoded = prompt.encode()
    text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), False, True
    try:
        assert mt.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        n_prompt = mt.mtmd_helper_get_n_tokens(chunks)
        n_past = lc.llama_pos(0)
        assert mt.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        batch = lc.llama_batch_init(1, 0, 1)
        out: list[int] = []
        for _ in range(max_tokens):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(vocab,))
            out.append(int(np.argmax(logits)))
            batch.n_tokens, batch.token[0], batch.pos[0] = 1, out[-1], n_past.value
            batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 0, 1
            assert lc.llama_decode(ctx, batch) == 0
            n_past.value += 1
        lc.llama_batch_free(batch)
        return out, n_prompt
    finally:
        mt.mtmd_input_chunks_free(chunks)
        mt.mtmd_bitmap_free(bitmap)
        mt.mtmd_free(mctx)
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def test_greedy_answer_is_libmtmds_own(client: openai.OpenAI, server: Server, models: Path) -> None:
    image, body = (
        png(0, IMAGE_SIZE),
        {"model": VLM, "messages": image_message(png(0, IMAGE_SIZE)), "add_generation_prompt": True},
    )
    prompt = requests.post(server.url + "/apply-template", json=body, timeout=60).json()["prompt"]
    assert prompt.count("<__media__>") == 1  # libmtmd's marker where the image was, as llama-server writes it
    ours = client.chat.completions.create(
        model=VLM, messages=image_message(image), max_tokens=8, temperature=0, logit_bias={EOS: -100}
    )
    tokens, n_prompt = reference(models, prompt, image, 8)
    theirs = requests.post(server.url + "/detokenize", json={"model": VLM, "tokens": tokens}, timeout=60).json()[
        "prompt"
    ]
    assert ours.choices[0].message.content == theirs.lstrip(" ")
    assert ours.usage.prompt_tokens == n_prompt  # the image's 16 tokens counted
    counted = requests.post(server.url + "/tokenize", json={**body, "return_token_strs": True}, timeout=60).json()
    assert counted["count"] == n_prompt and counted["tokens"].count(-1) == IMAGE_TOKENS  # llama-server's null id
    assert counted["token_strs"].count("<__media__>") == IMAGE_TOKENS


def test_another_image_another_answer(client: openai.OpenAI) -> None:
    """Same text, other pixels: other log-probabilities (no KV of the first image reused); the same
    image again: the very same ones (its own cells reused, or evaluated again alike)."""

    def logprobs(image: bytes) -> list[float]:
        reply = client.chat.completions.create(
            model=VLM, messages=image_message(image), max_tokens=3, temperature=0, logprobs=True
        )
        assert reply.choices[0].logprobs and reply.choices[0].logprobs.content
        return [t.logprob for t in reply.choices[0].logprobs.content]

    first, second = logprobs(png(1, IMAGE_SIZE)), logprobs(png(2, IMAGE_SIZE))
    assert first != second
    assert logprobs(png(1, IMAGE_SIZE)) == pytest.approx(first, abs=1e-4)


def test_anthropic_image_block(server: Server) -> None:
    from anthropic import Anthropic

    claude = Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    image = base64.b64encode(png(3, IMAGE_SIZE)).decode()
    content: Any = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": QUESTION},
    ]
    reply = claude.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": content}])
    text_only = claude.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": QUESTION}])
    assert reply.content and reply.usage.output_tokens >= 1
    # the image's 16 tokens and the newline that joins the marker to the text (llama-server's)
    assert reply.usage.input_tokens == text_only.usage.input_tokens + IMAGE_TOKENS + 1
    counted = claude.messages.count_tokens(model=VLM, messages=[{"role": "user", "content": content}])
    assert counted.input_tokens == reply.usage.input_tokens


def metric(server: Server, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_text_request_decodes_beside_an_image_request(client: openai.OpenAI, server: Server) -> None:
    """An image request and a text request of 400 tokens each, sent together: they share steps (one
    batch), so the server takes fewer steps than the 800 they would take one after the other."""
    steps = "impetus_engine_steps_total"
    before = metric(server, steps)
    image = [{"role": "user", "content": image_message(png(4, IMAGE_SIZE))[0]["content"]}]
    bodies = {"image": image, "text": [{"role": "user", "content": "Tell me a story."}]}
    replies: dict[str, Any] = {}
    start = threading.Barrier(2)

    def ask(name: str) -> None:
        start.wait()
        replies[name] = client.chat.completions.create(
            model=VLM, messages=bodies[name], max_tokens=400, temperature=0, logit_bias={EOS: -100}
        )

    threads = [threading.Thread(target=ask, args=(name,)) for name in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [replies[n].usage.completion_tokens for n in bodies] == [400, 400]
    assert replies["image"].usage.prompt_tokens > replies["text"].usage.prompt_tokens + IMAGE_TOKENS
    taken = metric(server, steps) - before
    assert taken < 400 + 400  # one after the other: at least 800 steps


def test_a_client_leaving_an_image_answer_leaves_the_model_serving(client: openai.OpenAI, server: Server) -> None:
    """Its sequence (cancelled, or finished first) ends and frees its image chunks once: the slot
    empties and the next image request is answered (a double free would take the worker down)."""
    stream = client.chat.completions.create(
        model=VLM, messages=image_message(png(8, IMAGE_SIZE)), max_tokens=400, logit_bias={EOS: -100}, stream=True
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while metric(server, "impetus_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "impetus_active_sequences") == 0
    again = client.chat.completions.create(model=VLM, messages=image_message(png(8, IMAGE_SIZE)), max_tokens=2)
    assert again.choices[0].finish_reason == "length"


def test_corrupt_image_is_a_400_and_the_server_goes_on(client: openai.OpenAI) -> None:
    broken = png(5, IMAGE_SIZE)[:60]  # the PNG header, then nothing
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=VLM, messages=image_message(broken), max_tokens=2)
    assert info.value.body["code"] == "invalid_image"
    ok = client.chat.completions.create(model=VLM, messages=image_message(png(5, IMAGE_SIZE)), max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_the_marker_in_a_message_text_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=VLM, messages=image_message(png(6, IMAGE_SIZE), "<__media__> twice"), max_tokens=2
        )
    assert info.value.body["code"] == "invalid_image" and "marker" in info.value.body["message"]


def test_the_projector_is_no_model(server: Server, client: openai.OpenAI) -> None:
    listed = {m["id"]: m for m in requests.get(server.url + "/api/models", timeout=30).json()["data"]}
    assert listed[VLM]["vision"] is True  # resident, with its projector
    assert listed[TEXT]["vision"] is False  # a GGUF with none beside it
    assert listed[UNLOADED]["state"] == "local" and listed[UNLOADED]["vision"] is True
    assert not any("mmproj" in n for n in listed)  # neither the one beside it nor the one at the top level
    loaded = requests.post(server.url + "/api/models/load", json={"model": "mmproj-tiny-llava-f32.gguf"}, timeout=60)
    assert loaded.status_code == 422 and "multimodal projector" in loaded.json()["error"]["message"], loaded.text
    cards = {m.id: m for m in client.models.list().data}
    assert "vision" in (cards[VLM].model_extra or {}).get("capabilities", [])


def test_a_text_gguf_given_an_image_is_a_400(server: Server, client: openai.OpenAI) -> None:
    loaded = requests.post(server.url + "/api/models/load", json={"model": TEXT}, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["vision"] is False, loaded.text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TEXT, messages=image_message(png(0, IMAGE_SIZE)), max_tokens=2)
    assert info.value.body["code"] == "model_not_supported"
    reply = client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("mmproj", ["../mmproj-tiny-llava-f32.gguf", "/etc/passwd", "nothing.gguf", TEXT])
def test_an_mmproj_option_it_cannot_take_is_a_400(server: Server, mmproj: str) -> None:
    """Confined as a model is (one refusal for what is outside or missing), and a projector."""
    loaded = requests.post(server.url + "/api/models/load", json={"model": TEXT, "mmproj": mmproj}, timeout=60)
    assert loaded.status_code == 400 and loaded.json()["error"]["param"] == "mmproj", loaded.text
    assert "/etc" not in loaded.json()["error"]["message"].replace(mmproj, "")


def test_the_mmproj_load_option(server: Server, client: openai.OpenAI) -> None:
    """llama-server's --mmproj: the text GGUF given the projector at the top level takes images."""
    body = {"model": TEXT, "mmproj": "mmproj-tiny-llava-f32.gguf"}
    loaded = requests.post(server.url + "/api/models/load", json=body, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["vision"] is True, loaded.text
    reply = client.chat.completions.create(model=TEXT, messages=image_message(png(0, IMAGE_SIZE)), max_tokens=2)
    text_only = client.chat.completions.create(
        model=TEXT, messages=[{"role": "user", "content": QUESTION}], max_tokens=2
    )
    assert reply.usage and text_only.usage
    assert reply.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS + 1


def test_image_positions_in_a_slots_cells() -> None:
    """A kept prefix never ends inside an image (it moves back to the image's start); the text fed
    before the next image stops at it."""
    from gerdsen_ai_server.engine.backends.llamacpp_vision import image_start, text_before_image

    a, b = -7, -9  # two images' keys
    prompt = [5, 6, a, a, a, b, b, 8, 9]
    assert [image_start(prompt, k) for k in range(len(prompt))] == [0, 1, 2, 2, 2, 5, 5, 7, 8]
    assert text_before_image(prompt) == 2 and text_before_image(prompt[7:]) == 2 and text_before_image([]) == 0


def test_which_projector_goes_with_a_gguf(tmp_path: Path) -> None:
    """LM Studio's folder rule: one model GGUF and an mmproj beside it pair; a folder of several
    models (the models dir's top level) pairs none; of several projectors, the first by name."""
    from gerdsen_ai_server.engine.backends.llamacpp_vision import find_mmproj

    def files(folder: Path, *names: str) -> Path:
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"GGUF")
        return folder

    one = files(tmp_path / "one", "m.Q4.gguf", "mmproj-m-f16.gguf")
    assert find_mmproj(one / "m.Q4.gguf") == one / "mmproj-m-f16.gguf"
    assert find_mmproj(one / "mmproj-m-f16.gguf") is None
    many = files(tmp_path / "many", "a.gguf", "b.gguf", "mmproj-a.gguf")
    assert find_mmproj(many / "a.gguf") is None
    two = files(tmp_path / "two", "m.gguf", "mmproj-m-f32.gguf", "mmproj-m-f16.gguf")
    assert find_mmproj(two / "m.gguf") == two / "mmproj-m-f16.gguf"
    assert find_mmproj(files(tmp_path / "none", "m.gguf") / "m.gguf") is None


def test_responses_input_image(client: openai.OpenAI) -> None:
    def tokens(content: list[dict[str, Any]]) -> int:
        reply = client.responses.create(model=VLM, input=[{"role": "user", "content": content}], max_output_tokens=2)
        assert reply.status in ("completed", "incomplete") and reply.usage
        return int(reply.usage.input_tokens)

    question = {"type": "input_text", "text": QUESTION}
    image = {"type": "input_image", "image_url": data_url(png(7, IMAGE_SIZE))}
    assert tokens([image, question]) == tokens([question]) + IMAGE_TOKENS + 1
