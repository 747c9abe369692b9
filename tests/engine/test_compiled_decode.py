"""The compiled decode step (engine/compiled.py) changes no token: the default model on MLX's CPU, float32,
greedy, with and without it, on one stream (mlx-lm's own cache, an int offset) and on a batch of prompts of
different lengths (the batch cache: left padding, a mask, an offset per sequence), as the engine decodes.

The model loads in this module's one thread (no engine here), as the engine's loader loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, generate_step

from gerdsen_ai_server.engine.compiled import compile_decode, is_compiled, uncompile_decode
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.engine.options import BackendOptions
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR

STEPS = 24
PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colours are",
    "def fibonacci(n):\n    ",
)


@pytest.fixture(scope="module")
def loaded() -> Iterator[Any]:
    yield LoaderFactory(BackendOptions(backend="mlx")).load(DEFAULT_MODEL, TEST_MODELS_DIR, "float32", trusted=True)


def one_stream(model: Any, prompt: list[int]) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=STEPS)]


def batch(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    gen = BatchGenerator(model, completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert(prompts, max_tokens=[STEPS] * len(prompts))
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    while sum(map(len, out.values())) < STEPS * len(prompts):
        for response in gen.next_generated():
            out[response.uid].append(response.token)
    gen.close()
    return [out[uid] for uid in uids]


def test_the_loader_compiles_the_default_models_decode_on_a_cpu(loaded: Any) -> None:
    assert mx.default_device() == mx.cpu
    assert is_compiled(loaded.model)


def test_greedy_tokens_are_the_same_with_and_without_the_compiled_step(loaded: Any) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # left padding in the batch
    uncompile_decode(model)
    try:
        plain = one_stream(model, prompts[0]), batch(model, prompts)
    finally:
        assert compile_decode(model)
    fast = one_stream(model, prompts[0]), batch(model, prompts)
    assert len(plain[0]) == STEPS and all(len(t) == STEPS for t in plain[1])
    assert fast == plain
