"""The vision backend in-process (engine/backends/vision.py), on a tiny random Qwen2-VL: requests
sent together get the answers each gets alone, a cancelled one leaves at once, stop
strings and max_tokens end them as on MLX, and a request whose images do not match its prompt fails
alone."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, TokenStream
from tests.support.models import default_model_folder

pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (make setup installs it: requirements-vision.txt)")

VLM = "tiny-qwen2-vl"
GREEDY = SamplingParams(temperature=0)


def image(seed: int) -> ImageInput:
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8")).save(out, format="PNG")
    data = out.getvalue()
    return ImageInput(data, "image/png", 96, 64, hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    from tests.support.tiny_vlm import build_tiny_qwen2_vl

    models: Path = tmp_path_factory.mktemp("vision-engine")
    build_tiny_qwen2_vl(models / VLM, default_model_folder(), seed=1)
    eng = InferenceEngine(EngineOptions(models, max_batch=4, max_queue=4, backend="mlx"))
    eng.start()
    eng.load_model(VLM).result(timeout=300)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def model(engine: InferenceEngine) -> LoadedModel:
    return engine.get_model(VLM)


def prompt(model: LoadedModel, images: list[ImageInput], text: str = "Describe it.") -> list[int]:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    rendered = model.tokenizer.decode(rendered) if not isinstance(rendered, str) else rendered
    ids: list[int] = model.model.prompt_ids(rendered, images)
    return ids


def submit(engine: InferenceEngine, model: LoadedModel, images: list[ImageInput], **kw) -> TokenStream:  # type: ignore[no-untyped-def]
    kw.setdefault("max_tokens", 6)
    kw.setdefault("sampling", GREEDY)
    return engine.submit(GenerationRequest(model=VLM, prompt_tokens=prompt(model, images), images=images, **kw))


def test_queued_requests_get_their_own_answers(engine: InferenceEngine, model: LoadedModel) -> None:
    alone = [submit(engine, model, [image(s)], logprobs=0).collect() for s in (1, 2)]
    together = [submit(engine, model, [image(s)], logprobs=0) for s in (1, 2)]
    for (text, last), stream in zip(alone, together, strict=True):
        again, last_again = stream.collect()
        assert (again, last_again.prompt_tokens) == (text, last.prompt_tokens)
    # two images in one prompt: each expanded into its own tokens
    two = submit(engine, model, [image(1), image(2)]).collect()[1]
    assert two.error is None and two.prompt_tokens > alone[0][1].prompt_tokens


def test_cancel_frees_the_model(engine: InferenceEngine, model: LoadedModel) -> None:
    stream = submit(engine, model, [image(3)], max_tokens=1500)
    next(iter(stream))
    queued = submit(engine, model, [image(4)], max_tokens=1500)
    stream.cancel()
    queued.cancel()
    deadline = time.monotonic() + 5
    while engine.stats().active_sequences + engine.stats().queued_sequences and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats().active_sequences + engine.stats().queued_sequences == 0
    assert submit(engine, model, [image(3)], max_tokens=2).collect()[1].finish_reason == "length"


def test_stop_string_and_max_tokens(engine: InferenceEngine, model: LoadedModel) -> None:
    text, last = submit(engine, model, [image(5)], max_tokens=6).collect()
    assert last.finish_reason == "length" and last.completion_tokens == 6
    stop = text.split()[1]  # the second word: the answer ends before it
    cut, last = submit(engine, model, [image(5)], max_tokens=6, stop=[stop]).collect()
    assert last.finish_reason == "stop" and last.stop_sequence == stop
    assert cut == text[: text.index(stop)]


def test_images_that_do_not_match_the_prompt_fail_alone(engine: InferenceEngine, model: LoadedModel) -> None:
    ids = prompt(model, [image(1)])
    wrong = GenerationRequest(model=VLM, prompt_tokens=ids, max_tokens=3, sampling=GREEDY, images=[image(1), image(2)])
    _, last = engine.submit(wrong).collect()
    assert last.error is not None and "image tokens" in last.error
    assert submit(engine, model, [image(1)], max_tokens=2).collect()[1].error is None
