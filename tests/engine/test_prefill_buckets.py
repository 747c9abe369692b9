"""Prefill in padded length buckets (engine/prefill_buckets.py, IMPETUS_PREFILL_BUCKET): the model really
sees bucketed lengths, the answers (tokens and log-probabilities) are those of an unpadded prefill, and
the prompt cache stores and reuses prompts without the padding. In-process, on a tiny random llama with the
default model's tokenizer and chat template (log-probabilities compared too: its greedy tokens hardly depend on
the context), so the module costs seconds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions, LoadOptions
from gerdsen_ai_server.engine.prefill_buckets import padded_length, prompt_batch, resolve
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.answers import Answer, answer_of, chat
from tests.support.tiny_models import build_tiny_llama, tiny_llama_engine

GREEDY = SamplingParams(temperature=0)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
# Chat prompts of ~30 to ~110 tokens: their lengths fall in two buckets of 64 and are no multiples of it.
TEXTS = [
    "Hi.",
    "Tell me about the sea and the ships that sail on it.",
    "Write a short poem about the moon, the tides, the fishermen who go out at night, and the lighthouse that "
    "guides them home through fog and storm, in four lines with a rhyme.",
]


class ShapeRecorder:
    """The model, recording the length of every multi-token forward pass (a prefill) it is called with."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lengths: list[int] = []

    def __call__(self, tokens: Any, **kwargs: Any) -> Any:
        if tokens.shape[1] > 1:
            self.lengths.append(int(tokens.shape[1]))
        return self.model(tokens, **kwargs)


def submit(engine: InferenceEngine, model: LoadedModel, prompt: list[int], sampling: SamplingParams) -> Any:
    return engine.submit(
        GenerationRequest(model=model.model_id, prompt_tokens=prompt, max_tokens=8, sampling=sampling, logprobs=0)
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    yield from tiny_llama_engine(tmp_path_factory, "tiny-buckets")


@pytest.fixture(scope="module")
def model(engine: InferenceEngine) -> LoadedModel:
    return engine.get_model("tiny-buckets")


@pytest.fixture(scope="module")
def batch(engine: InferenceEngine, model: LoadedModel) -> Iterator[Any]:
    """The MLX backend's prompt batch, its model wrapped in a ShapeRecorder; bucket 0 unless a test sets it."""
    (resident,) = [r for r in engine.residents() if r.loaded.model_id == model.model_id]
    prompts = prompt_batch(resident.backend._generator)  # type: ignore[attr-defined]  # noqa: SLF001
    real = prompts.model
    prompts.model = ShapeRecorder(real)
    yield prompts
    prompts.model, prompts.bucket = real, 0


def same(a: Answer, b: Answer) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(abs(x - y) < 1e-4 for x, y in zip(a[1], b[1], strict=True))


def test_padded_length() -> None:
    assert [padded_length(n, 64, 2048) for n in (1, 37, 64, 65, 2000, 2048)] == [64, 64, 64, 128, 2048, 2048]
    assert padded_length(37, 0, 2048) == 37  # off
    assert padded_length(100, 64, 96) == 100  # never past the step size, never below the prompt
    assert resolve(0) == 0 and resolve(32) == 32
    assert resolve(-1) == 0  # auto: off where MLX computes on the CPU (these tests)


def test_the_setting_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPETUS_PREFILL_BUCKET", "128")
    assert EngineOptions.from_settings(Settings()).prefill_bucket == 128
    monkeypatch.setenv("IMPETUS_PREFILL_BUCKET", "-2")
    with pytest.raises(ValidationError, match="prefill_bucket"):
        Settings()


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_bucketed_prefill_gives_the_same_answers(
    engine: InferenceEngine, model: LoadedModel, batch: Any, sampling: SamplingParams
) -> None:
    prompts = [chat(model, t) for t in TEXTS]
    engine.prompt_cache_enabled = False
    try:
        batch.bucket = 0
        batch.model.lengths.clear()
        plain = [answer_of(submit(engine, model, p, sampling)) for p in prompts]
        assert batch.model.lengths == [len(p) - 1 for p in prompts]  # mlx-lm holds the last token back

        batch.bucket = 64
        batch.model.lengths.clear()
        alone = [answer_of(submit(engine, model, p, sampling)) for p in prompts]
        assert batch.model.lengths == [padded_length(len(p) - 1, 64, 2048) for p in prompts]
        assert set(batch.model.lengths) == {64, 128}

        streams = [submit(engine, model, p, sampling) for p in prompts]  # prefilled in one or more groups
        together = [answer_of(s) for s in streams]
        assert all(n % 64 == 0 for n in batch.model.lengths)
    finally:
        batch.bucket = 0
        engine.prompt_cache_enabled = True
    for i, expected in enumerate(plain):
        assert same(alone[i], expected), (i, alone[i], expected)
        assert same(together[i], expected), (i, together[i], expected)


def test_the_prompt_cache_keeps_no_padding(engine: InferenceEngine, model: LoadedModel, batch: Any) -> None:
    first = chat(model, TEXTS[1])
    engine.prompt_cache_enabled = False
    try:
        cold = answer_of(submit(engine, model, first, GREEDY))
    finally:
        engine.prompt_cache_enabled = True
    batch.bucket = 64
    try:
        stored = answer_of(submit(engine, model, first, GREEDY))  # stored after a bucketed prefill
        hits = engine.stats().prompt_cache_hits_total
        batch.model.lengths.clear()
        again = answer_of(submit(engine, model, first, GREEDY))
        assert engine.stats().prompt_cache_hits_total == hits + 1
        assert batch.model.lengths == []  # the whole prompt came from the cache: nothing left to prefill

        # A next turn extends the cached prompt: only its new tokens are prefilled (bucketed), behind a
        # cached prefix whose KV holds exactly the prompt and answer, no padding.
        history = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": "Sure."}]
        second = list(
            model.tokenizer.apply_chat_template(
                [*history, {"role": "user", "content": "And the rivers?"}], add_generation_prompt=True
            )
        )
        warm = answer_of(submit(engine, model, second, GREEDY))
        assert engine.stats().prompt_cache_hits_total == hits + 2
        assert len(batch.model.lengths) == 1 and batch.model.lengths[0] % 64 == 0  # its new tokens, padded
    finally:
        batch.bucket = 0
    engine.prompt_cache_enabled = False
    try:
        fresh = answer_of(submit(engine, model, second, GREEDY))
    finally:
        engine.prompt_cache_enabled = True
    assert same(stored, cold) and same(again, cold)
    assert same(warm, fresh)


def test_a_quantized_kv_cache_is_bucketed_too(
    engine: InferenceEngine, model: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The batched 8-bit cache (engine/quantized_cache.py) is a BatchKVCache with its own roll: padded the same way.
    # Heads of 64 (hidden 256, 4 heads): mlx-lm quantizes the cache in groups of 64 along a head.
    folder = build_tiny_llama(tmp_path_factory.mktemp("q8") / "tiny-q8", TEST_MODELS_DIR / DEFAULT_MODEL, hidden=256)
    loaded = engine.load_model(str(folder), trusted=True, options=LoadOptions(kv_bits=8)).result(timeout=120)
    try:
        (resident,) = [r for r in engine.residents() if r.loaded.model_id == loaded.model_id]
        prompts_batch = prompt_batch(resident.backend._generator)  # type: ignore[attr-defined]  # noqa: SLF001
        recorder = prompts_batch.model = ShapeRecorder(prompts_batch.model)
        prompts = [chat(model, t) for t in TEXTS]
        engine.prompt_cache_enabled = False
        try:
            answers = {}
            for bucket in (0, 64):
                prompts_batch.bucket = bucket
                answers[bucket] = [answer_of(submit(engine, loaded, p, GREEDY)) for p in prompts]
        finally:
            engine.prompt_cache_enabled = True
        assert recorder.lengths == [len(p) - 1 for p in prompts] + [
            padded_length(len(p) - 1, 64, 2048) for p in prompts
        ]
        assert resident.loaded.kv_bits == 8
        for plain, bucketed in zip(answers[0], answers[64], strict=True):
            assert same(bucketed, plain), (bucketed, plain)
    finally:
        engine.unload_model(loaded.model_id).result(timeout=30)
