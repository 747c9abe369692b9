"""The prompt cache's tiers in-process, on real MLX: a model loaded again under the same id with other
weights never reads the first one's disk files (they are deleted), and its greedy output is the
one computed with no cache at all; the same model loaded again reads them (a disk hit)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.prompt_cache import DISK_FOLDER, DISK_MIN_GAIN
from gerdsen_ai_server.engine.prompt_cache_format import read_header
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.tiny_models import build_tiny_llama

# Token ids (the tiny models share the default model's tokenizer): long enough that a disk file
# covering it is worth reading (DISK_MIN_GAIN).
PROMPT = list(range(20, 60 + DISK_MIN_GAIN))


def answer(engine: InferenceEngine) -> list[tuple[int, float]]:
    # Log-probabilities too: a tiny random model's greedy tokens hardly depend on the context.
    request = GenerationRequest(
        model="swap", prompt_tokens=PROMPT, max_tokens=8, sampling=SamplingParams(temperature=0), logprobs=0
    )
    return [(lp.token_id, round(lp.logprob, 4)) for event in engine.submit(request) for lp in event.logprobs]


def settle(engine: InferenceEngine) -> None:
    deadline = time.monotonic() + 30
    while (engine.inflight or engine.prompt_cache.pending) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.prompt_cache.disk.flush(30)


def test_disk_entries_never_serve_other_weights_under_the_same_id(tmp_path: Path) -> None:
    first = build_tiny_llama(tmp_path / "a" / "swap", TEST_MODELS_DIR / DEFAULT_MODEL, seed=1)
    second = build_tiny_llama(tmp_path / "b" / "swap", TEST_MODELS_DIR / DEFAULT_MODEL, seed=2)
    engine = InferenceEngine(EngineOptions(tmp_path, backend="mlx", prompt_cache_disk_bytes=64 << 20))
    engine.start()
    disk = engine.prompt_cache.disk
    try:
        engine.load_model(str(first), trusted=True).result(timeout=60)
        cold_first = answer(engine)
        settle(engine)
        assert disk.writes == 1 and len(list((tmp_path / DISK_FOLDER).glob("*.safetensors"))) == 1
        engine.unload_model("swap").result(timeout=30)

        engine.load_model(str(second), trusted=True).result(timeout=60)
        assert len(disk) == 0  # the first weights' file is gone: never read for these
        hits = engine.stats().prompt_cache_hits_total
        warm = answer(engine)
        assert engine.stats().prompt_cache_hits_total == hits and disk.hits == 0
        engine.prompt_cache_enabled = False
        try:
            assert warm == answer(engine)  # the same as with no cache at all
        finally:
            engine.prompt_cache_enabled = True
        settle(engine)
        engine.unload_model("swap").result(timeout=30)

        engine.load_model(str(second), trusted=True).result(timeout=60)  # the same files again
        assert answer(engine) == warm and disk.hits == 1
        assert warm != cold_first  # the two models differ: a cross-model hit would have shown

        # L1: the running batch's KV bytes, while a sequence decodes (and none once it is done).
        request = GenerationRequest(model="swap", prompt_tokens=PROMPT[:9], max_tokens=4)
        live = [engine.prompt_cache.tiers()["live"].bytes for _ in engine.submit(request)]
        assert live[0] > 0
        settle(engine)
        assert engine.prompt_cache.tiers()["live"].bytes == 0
    finally:
        engine.shutdown()


def negate_values(path: Path) -> None:
    """Rewrite a quantized cache file with its values negated: still valid, a different cache."""
    cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    for layer in cache:
        q, scales, biases = layer.values
        layer.values = (q, -scales, -biases)
    save_prompt_cache(str(path), cache, metadata)


def test_a_quantized_kv_cache_comes_back_from_disk_in_a_new_engine(tmp_path: Path) -> None:
    """KV bits 8 (quantized_cache.py's batched cache): its entries are written as mlx-lm's
    QuantizedKVCache and come back into a quantized batch in the next engine: the same answer,
    and a file whose values were changed changes its answer (the cache read is the one used)."""
    folder = build_tiny_llama(tmp_path / "tinyq", TEST_MODELS_DIR / DEFAULT_MODEL, hidden=256, seed=3)  # head size 64
    prompts = [PROMPT, [t + 100 for t in PROMPT]]
    runs: list[list[list[tuple[int, float]]]] = []
    for run in range(2):  # the second engine is a restart on the same models folder
        engine = InferenceEngine(EngineOptions(tmp_path, backend="mlx", kv_bits=8, prompt_cache_disk_bytes=64 << 20))
        engine.start()
        disk = engine.prompt_cache.disk
        try:
            engine.load_model(str(folder), trusted=True).result(timeout=60)
            runs.append([])
            for prompt in prompts:
                request = GenerationRequest(
                    model="tinyq",
                    prompt_tokens=prompt,
                    max_tokens=6,
                    sampling=SamplingParams(temperature=0),
                    logprobs=0,
                )
                runs[-1].append(
                    [(lp.token_id, lp.logprob) for event in engine.submit(request) for lp in event.logprobs]
                )
                settle(engine)
            assert disk.hits == 2 * run and disk.skipped == 0 and disk.rejected == 0
        finally:
            engine.shutdown()
        if run == 0:
            files = list((tmp_path / DISK_FOLDER).glob("*.safetensors"))
            (second,) = [p for p in files if json.loads(read_header(p)["tokens"])[: len(PROMPT)] == prompts[1]]
            negate_values(second)
    (same, changed_answer), (cold_same, cold_changed) = runs[1], runs[0]
    assert [t for t, _ in same] == [t for t, _ in cold_same]
    assert max(abs(a - b) for (_, a), (_, b) in zip(same, cold_same, strict=True)) < 1e-3
    assert max(abs(a - b) for (_, a), (_, b) in zip(changed_answer, cold_changed, strict=True)) > 1e-2


def test_a_llamacpp_slot_comes_back_from_disk_in_a_new_engine(tmp_path: Path) -> None:
    """llama.cpp (backends/llamacpp_state.py): a finished slot's cells are saved to the disk tier and
    restored into a slot of the next engine's context: a disk hit, the same greedy answer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    options = EngineOptions(
        tmp_path,
        backend="llamacpp",
        max_batch=2,
        context_length=512,
        llamacpp_threads=1,
        prompt_cache_disk_bytes=64 << 20,
    )
    runs: list[list[tuple[int, float]]] = []
    for run in range(2):
        engine = InferenceEngine(options)
        engine.start()
        try:
            engine.load_model(DEFAULT_MODEL).result(timeout=120)
            request = GenerationRequest(
                model=DEFAULT_MODEL,
                prompt_tokens=PROMPT,
                max_tokens=6,
                sampling=SamplingParams(temperature=0),
                logprobs=0,
            )
            runs.append([(lp.token_id, lp.logprob) for event in engine.submit(request) for lp in event.logprobs])
            disk = engine.prompt_cache.disk
            deadline = time.monotonic() + 30
            while run == 0 and not disk.writes and time.monotonic() < deadline:  # saved after the answer
                time.sleep(0.05)
            assert (disk.hits, disk.writes, disk.rejected) == (run, 1 - run, 0)
            assert engine.stats().prompt_cache_hits_total == run  # the slot started from the restored cells
        finally:
            engine.unload_model(DEFAULT_MODEL).result(timeout=30)
            engine.shutdown()
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]] and len(runs[0]) == 6
    # The first token's logits: computed in the cold prompt's 168-row prefill batch, after the restore
    # by a one-token decode; llama.cpp's f16 kernels differ by up to ~0.16 there (batch mates change
    # logits, docs/llamacpp.md), the tokens do not.
    assert max(abs(a - b) for (_, a), (_, b) in zip(runs[0], runs[1], strict=True)) < 0.3
