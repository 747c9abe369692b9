"""A vision-language model on the real server (mlx-vlm, engine/backends/vision.py): a tiny random
Qwen2-VL built here, asked through the OpenAI and Anthropic SDKs with base64 images.

Its answers are checked against mlx-vlm itself (``mlx_vlm.generate`` in this process, same folder,
same image, greedy and seeded), its usage against the image tokens mlx-vlm counts; two images give
two answers (no KV shared: the backend keeps no prompt cache); a text-only request to it works; a
text request to the default model finishes while a long image request is still decoding. Requests to
the VLM batch (vision_batch.py): four images and a text-only request sent together decode in one batch,
each with its alone-answer and its own sampling; a client that leaves frees its row.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.images import QUESTION, data_url, image_message, png
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server

pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (make setup installs it: requirements-vision.txt)")

pytestmark = pytest.mark.server

VLM = "tiny-qwen2-vl"
EOS = "2"  # <|im_end|> in the tiny model's (SmolLM2's) tokenizer: biased away, answers run their full length


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_vlm import build_tiny_qwen2_vl

    folder = tmp_path_factory.mktemp("vision-models")
    build_tiny_qwen2_vl(folder / VLM, default_model_folder())
    (folder / DEFAULT_MODEL).symlink_to(default_model_folder(), target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("vision-server"), IMPETUS_MODELS_DIR=str(models))
    try:
        loaded = requests.post(srv.url + "/api/models/load", json={"model": VLM}, timeout=300)
        assert loaded.status_code == 200, loaded.text
        yield srv
    finally:
        stop_server(srv, wait=False)


@pytest.fixture(scope="module")
def client(server: Server):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def reference(models: Path, image: bytes, tmp: Path, **sampling: Any) -> Any:
    """mlx-vlm's own answer: its loader, its chat template, its generate, the same image file."""
    import mlx_vlm

    path = tmp / "image.png"
    path.write_bytes(image)
    model, processor = mlx_vlm.load(str(models / VLM))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return mlx_vlm.generate(model, processor, prompt, image=[str(path)], max_tokens=8, verbose=False, **sampling)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 3}], ids=["greedy", "seeded"])
def test_image_answer_is_mlx_vlms(client, models: Path, tmp_path: Path, sampling: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    image = png(0)
    ours = client.chat.completions.create(model=VLM, messages=image_message(image), max_tokens=8, **sampling)
    theirs = reference(models, image, tmp_path, **sampling)
    # mlx-vlm keeps the first token's leading space; a chat answer drops it (as mlx_lm.server does)
    assert ours.choices[0].message.content == theirs.text.lstrip(" ")
    assert ours.choices[0].finish_reason == "length"
    # usage counts the image's tokens: 16 for this model's 112x112 cap, where the template wrote one
    assert ours.usage.prompt_tokens == theirs.prompt_tokens
    assert ours.usage.completion_tokens == 8


def test_two_images_two_answers(client) -> None:  # type: ignore[no-untyped-def]
    """The same prompt text with another image: other log-probabilities (random weights may still pick
    the same tokens); the same image again: the very same ones (nothing carried over between them)."""

    def logprobs(image: bytes) -> list[float]:
        reply = client.chat.completions.create(
            model=VLM, messages=image_message(image), max_tokens=3, temperature=0, logprobs=True
        )
        return [t.logprob for t in reply.choices[0].logprobs.content]

    first = logprobs(png(1))
    assert logprobs(png(2, 256)) != first
    assert logprobs(png(1)) == first


def test_text_only_request_to_the_vision_model(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model=VLM, messages=messages, max_tokens=5, temperature=0)
    assert reply.choices[0].message.content
    counted = requests.post(server.url + "/tokenize", json={"model": VLM, "messages": messages}, timeout=30).json()
    assert reply.usage.prompt_tokens == counted["count"]


def test_image_beside_tools_described_in_the_prompt(client) -> None:  # type: ignore[no-untyped-def]
    """This template has no tools: their description goes first as a system message, and the image
    parts must still land in the user's message (serving/chat.py ``with_image_parts``)."""
    tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {}}}}
    with_image = client.chat.completions.create(model=VLM, messages=image_message(png(0)), tools=[tool], max_tokens=2)
    text_only = client.chat.completions.create(
        model=VLM, messages=[{"role": "user", "content": QUESTION}], tools=[tool], max_tokens=2
    )
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 18


def test_anthropic_image_block(server: Server) -> None:
    from anthropic import Anthropic

    client = Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    image = base64.b64encode(png(0)).decode()
    content: Any = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": QUESTION},
    ]
    reply = client.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": content}])
    text_only = client.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": QUESTION}])
    # the image's 16 tokens (a 112x112 cap, 2x2-merged 14-pixel patches) between <|vision_start|> and <|vision_end|>
    assert reply.usage.input_tokens == text_only.usage.input_tokens + 18


def test_tokenize_counts_the_image_as_the_chat_does(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    """/tokenize's ids are the chat's prompt, each image expanded into its tokens (serving/chat.py
    ``chat_prompt``), and /apply-template's text holds the template's placeholder for it."""
    messages = image_message(png(4))
    reply = client.chat.completions.create(model=VLM, messages=messages, max_tokens=1)
    body = {"model": VLM, "messages": messages, "add_generation_prompt": True}
    counted = requests.post(server.url + "/tokenize", json={**body, "return_token_strs": True}, timeout=60).json()
    assert counted["count"] == reply.usage.prompt_tokens == len(counted["tokens"])
    assert counted["token_strs"].count("<|image_pad|>") == 16  # a 112x112 cap: 2x2-merged 14-pixel patches
    text = requests.post(server.url + "/apply-template", json=body, timeout=60).json()["prompt"]
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1  # the placeholder, as chat renders it


def test_count_tokens_counts_the_image_as_messages_does(server: Server) -> None:
    from anthropic import Anthropic

    claude = Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    image = base64.b64encode(png(5)).decode()
    content: Any = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": QUESTION},
    ]
    messages: Any = [{"role": "user", "content": content}]
    reply = claude.messages.create(model=VLM, max_tokens=1, messages=messages)
    counted = claude.messages.count_tokens(model=VLM, messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens


def test_responses_input_image(client) -> None:  # type: ignore[no-untyped-def]
    def tokens(content: list[dict[str, Any]]) -> int:
        reply = client.responses.create(model=VLM, input=[{"role": "user", "content": content}], max_output_tokens=3)
        assert reply.status in ("completed", "incomplete")
        return int(reply.usage.input_tokens)

    question = {"type": "input_text", "text": QUESTION}
    assert tokens([{"type": "input_image", "image_url": data_url(png(0))}, question]) == tokens([question]) + 18


def test_text_model_runs_while_an_image_request_decodes(client) -> None:  # type: ignore[no-untyped-def]
    """The engine steps the vision model like any backend: the default model's batch decodes between
    its steps."""
    done: dict[str, float] = {}
    started = threading.Event()

    def long_image_request() -> None:
        stream = client.chat.completions.create(
            model=VLM, messages=image_message(png(3)), max_tokens=300, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
        done["image"] = time.monotonic()

    worker = threading.Thread(target=long_image_request)
    worker.start()
    assert started.wait(60)
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    done["text"] = time.monotonic()
    worker.join(120)
    assert reply.choices[0].message.content
    assert done["text"] < done["image"], "the text request waited for the image request to end"


def metric(server: Server, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_images_and_text_decode_in_one_batch(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    """Four image requests (two greedy, two seeded at their own temperatures) and a text-only request,
    sent together: each gets the answer it gets alone, in far fewer engine steps than tokens (one
    request at a time takes a step per token: 5 x 24; they may still reach the engine some steps apart)."""
    tokens = 24
    asks: list[dict[str, Any]] = [
        {"messages": image_message(png(10)), "temperature": 0},
        {"messages": image_message(png(11, 256)), "temperature": 0, "logprobs": True},
        {"messages": image_message(png(12)), "temperature": 0.9, "seed": 5},
        {"messages": image_message(png(13)), "temperature": 0.7, "top_p": 0.9, "seed": 8},
        {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0},
    ]

    def answer(ask: dict[str, Any]) -> tuple[str | None, Any]:
        # a logit bias on the end token keeps every answer the full length (a random model may end early)
        reply = client.chat.completions.create(model=VLM, max_tokens=tokens, logit_bias={EOS: -100}, **ask)
        assert reply.usage.completion_tokens == tokens
        logprobs = reply.choices[0].logprobs
        return reply.choices[0].message.content, logprobs and [t.logprob for t in logprobs.content]

    alone = [answer(ask) for ask in asks]
    together: dict[int, tuple[str | None, Any]] = {}
    steps = metric(server, "impetus_engine_steps_total")
    threads = [threading.Thread(target=lambda i=i: together.update({i: answer(asks[i])})) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    steps = metric(server, "impetus_engine_steps_total") - steps
    assert [together[i][0] for i in range(len(asks))] == [text for text, _ in alone]
    assert max(abs(a - b) for a, b in zip(together[1][1], alone[1][1], strict=True)) < 1e-4
    assert steps < 3 * tokens, f"{steps} steps for {len(asks)} x {tokens} tokens: not batched"


def settled(server: Server, name: str, value: float) -> float:
    """The metric once it reaches ``value`` (the engine recounts at the end of its step), or after 10 s."""
    deadline = time.monotonic() + 10
    while (seen := metric(server, name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def test_a_request_joins_the_running_batch(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    """A request sent while a long one decodes joins its batch mid-way (continuous batching): it ends
    while the long one still decodes (one at a time, it would wait for its 1,500 tokens), and both
    answers are what each gets alone (the long one's first 40 tokens)."""

    def ask(image: bytes, tokens: int, stream: bool = False) -> Any:
        return client.chat.completions.create(
            model=VLM,
            messages=image_message(image),
            max_tokens=tokens,
            temperature=0,
            logit_bias={EOS: -100},
            stream=stream,
        )

    long_start, short_alone = ask(png(30), 40).choices[0].message.content, ask(png(31), 6).choices[0].message.content
    text = ""
    stream = ask(png(30), 1500, stream=True)
    try:
        for n, chunk in enumerate(stream):
            text += (chunk.choices and chunk.choices[0].delta.content) or ""
            if n == 4:
                assert ask(png(31), 6).choices[0].message.content == short_alone
                assert settled(server, "impetus_active_sequences", 1) == 1, "the short request waited for the long one"
            if len(text) >= len(long_start) or n > 400:
                break
    finally:
        stream.close()
    assert text.startswith(long_start)
    assert settled(server, "impetus_requests_in_flight", 0) == 0


def test_a_closed_stream_frees_its_row(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    """Two long image streams decode together; one client leaves: its row goes (the other keeps
    decoding), and the engine counts it cancelled."""
    cancelled = 'impetus_engine_requests_total{outcome="cancelled"}'
    before = metric(server, cancelled)
    streams = [
        client.chat.completions.create(
            model=VLM, messages=image_message(png(seed)), max_tokens=1500, stream=True, logit_bias={EOS: -100}
        )
        for seed in (20, 21)
    ]
    try:
        readers = [iter(s) for s in streams]
        for reader in readers:
            for _ in range(3):
                next(reader)
        assert settled(server, "impetus_active_sequences", 2) == 2
        streams[0].close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and metric(server, cancelled) < before + 1:
            next(readers[1])
        assert metric(server, cancelled) == before + 1
        assert metric(server, "impetus_active_sequences") == 1
        next(readers[1])  # still decoding
    finally:
        for stream in streams:
            stream.close()
    assert settled(server, "impetus_active_sequences", 0) == 0


def test_no_embeddings_from_the_vision_model(client) -> None:  # type: ignore[no-untyped-def]
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=VLM, input="hello")
    assert refused.value.code == "model_not_supported"


def test_a_load_option_it_cannot_take_is_a_400(server: Server) -> None:
    load = {"model": VLM, "alias": "vlm-kv4", "kv_bits": 4}
    reply = requests.post(server.url + "/api/models/load", json=load, timeout=120)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "kv_bits"


def test_a_cross_attention_family_is_refused_at_load(tmp_path: Path) -> None:
    """Llama 3.2 Vision (mllama) needs its cross-attention states at every decode step, which the
    batch does not carry: refused with its reason, never answered wrongly."""
    from gerdsen_ai_server.engine.errors import ModelLoadError
    from gerdsen_ai_server.engine.formats.vision import load_vision

    (tmp_path / "config.json").write_text('{"model_type": "mllama", "vision_config": {}}')
    with pytest.raises(ModelLoadError, match="mllama"):
        load_vision(tmp_path)
