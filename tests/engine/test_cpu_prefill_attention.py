"""The CPU prompt attention (engine/attention.py): equal to MLX's ``scaled_dot_product_attention`` within float
rounding for every mask mlx-lm passes (none, "causal" with a cache offset, a boolean batch mask with left padding,
an additive mask) at grouped-query shapes, and a tiny model's answers through our engine (tokens and
log-probabilities, prompts prefilled in passes over the KV of the passes before, alone and batched) the same
with it on and off."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models import base

from gerdsen_ai_server.engine import attention
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.prefill_buckets import prompt_batch
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
from tests.support.answers import Answer, answer_of, chat
from tests.support.tiny_models import tiny_llama_engine


def qkv(batch: int, heads: int, kv_heads: int, length: int, keys: int, seed: int = 0) -> tuple[mx.array, ...]:
    mx.random.seed(seed)
    q = mx.random.normal((batch, length, heads, 64)).transpose(0, 2, 1, 3)  # as a model's projection hands it
    buffer = mx.random.normal((2, batch, kv_heads, keys + 32, 64))  # a cache's buffer, longer than its content
    return q, buffer[0][..., :keys, :], buffer[1][..., :keys, :]


def causal_mask(length: int, keys: int, left_padding: list[int] | None = None) -> mx.array:
    return base.create_causal_mask(
        length, keys - length, left_padding=mx.array(left_padding) if left_padding is not None else None
    )


CASES = {
    "causal-offset": (1, 14, 2, 37, 300, "causal"),
    "causal-fresh": (1, 4, 1, 50, 50, "causal"),
    "no-gqa": (1, 4, 4, 20, 90, "causal"),
    "bool-left-padding": (2, 8, 2, 24, 160, "padded"),
    "bool-masked-rows": (2, 4, 2, 24, 24, "padded"),  # row 1's first 10 queries see no key at all
    "bool-per-head": (1, 4, 2, 16, 40, "per-head"),
    "additive": (1, 6, 2, 12, 70, "additive"),
    "none": (1, 4, 2, 9, 30, None),
}


@pytest.mark.parametrize("blocks", [False, True], ids=["one-block", "blocks"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_mlx_attention(case: str, blocks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    batch, heads, kv_heads, length, keys, kind = CASES[case]
    q, k, v = qkv(batch, heads, kv_heads, length, keys)
    mask: Any = kind
    if kind == "padded":  # mlx-lm's BatchKVCache: (B, 1, L, S) booleans, row 1 left-padded
        mask = causal_mask(length, keys, [0, 30 if keys > 30 else 10])
    elif kind == "per-head":
        mask = mx.random.uniform(shape=(1, heads, length, keys)) > 0.3
    elif kind == "additive":
        mask = mx.where(causal_mask(length, keys), 0.0, -1e9)
    if blocks:  # a few query positions at a time (long prompts over long caches)
        monkeypatch.setattr(attention, "BLOCK_SCORES", 5 * heads * keys * batch)
    scale = 64**-0.5
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    got = attention.prefill_attention(q, k, v, scale, mask)
    assert got.shape == expected.shape and got.dtype == mx.float32
    assert mx.allclose(got, expected, rtol=1e-4, atol=1e-5).item(), mx.abs(got - expected).max().item()


def test_mlx_lm_keeps_what_it_does_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> mx.array:
        raise AssertionError("the CPU prompt attention took a call that is mlx-lm's")

    monkeypatch.setattr(attention, "prefill_attention", refuse)
    scale = 64**-0.5
    q, k, v = qkv(1, 4, 2, 1, 40)  # a decode step
    out = attention.scaled_dot_product_attention(q, k, v, cache=None, scale=scale, mask=None)
    assert mx.array_equal(out, mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=None)).item()
    q, k, v = (x.astype(mx.bfloat16) for x in qkv(1, 4, 2, 8, 40))  # not float32
    attention.scaled_dot_product_attention(q, k, v, cache=None, scale=scale, mask="causal")
    q, k, v = qkv(1, 4, 2, 8, 40)  # too few scores to pay
    attention.scaled_dot_product_attention(q, k, v, cache=None, scale=scale, mask="causal")
    monkeypatch.setattr(attention, "MIN_SCORES", 2)
    monkeypatch.setattr(attention, "enabled", False)  # the A/B switch
    q, k, v = qkv(1, 4, 2, 8, 40)
    attention.scaled_dot_product_attention(q, k, v, cache=None, scale=scale, mask="causal")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    yield from tiny_llama_engine(tmp_path_factory, "tiny-attention")


@pytest.fixture(scope="module")
def model(engine: InferenceEngine) -> LoadedModel:
    return engine.get_model("tiny-attention")


TEXTS = [
    "Tell me about the sea and the ships that sail on it, the harbours they leave and the storms they meet.",
    "And the rivers that run into it, from the mountains through the valleys and the towns?",
]


def test_the_engine_answers_the_same_with_it_on_and_off(
    engine: InferenceEngine, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sys.modules["mlx_lm.models.llama"].scaled_dot_product_attention is attention.scaled_dot_product_attention
    calls: list[tuple[int, int]] = []
    real = attention.prefill_attention

    def counted(queries: mx.array, keys: mx.array, *rest: Any) -> mx.array:
        calls.append((queries.shape[2], keys.shape[2]))
        return real(queries, keys, *rest)

    monkeypatch.setattr(attention, "prefill_attention", counted)
    monkeypatch.setattr(attention, "MIN_SCORES", 2)  # the tiny model's passes are far below the real bound
    (resident,) = [r for r in engine.residents() if r.loaded.model_id == model.model_id]
    prompts = prompt_batch(resident.backend._generator)  # type: ignore[attr-defined]  # noqa: SLF001
    # Prompts prefilled 16 tokens a pass: every pass after the first attends over the KV cached before it, as a
    # later turn's new tokens do behind a cached prefix. Each prompt alone, then both in one group (padded).
    step, prompts.prefill_step_size = prompts.prefill_step_size, 16
    engine.prompt_cache_enabled = False
    answers: dict[bool, list[Answer]] = {}
    try:
        for on in (True, False):
            monkeypatch.setattr(attention, "enabled", on)
            requests = [
                GenerationRequest(
                    model=model.model_id,
                    prompt_tokens=chat(model, text),
                    max_tokens=8,
                    sampling=SamplingParams(temperature=0),
                    logprobs=0,
                )
                for text in TEXTS
            ]
            alone = [answer_of(engine.submit(r)) for r in requests]
            together = [answer_of(s) for s in [engine.submit(r) for r in requests]]
            answers[on] = alone + together
    finally:
        prompts.prefill_step_size = step
        engine.prompt_cache_enabled = True
    if mx.default_device() == mx.cpu:
        assert any(keys > queries > 1 for queries, keys in calls), calls
    for (ids_on, lps_on), (ids_off, lps_off) in zip(answers[True], answers[False], strict=True):
        assert ids_on == ids_off
        assert all(abs(a - b) < 1e-4 for a, b in zip(lps_on, lps_off, strict=True))
