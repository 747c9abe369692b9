"""Quantized stays quantized unless it pays (engine/dtype.py): the dtype each load computes in, and the
registry's estimate against what the load holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gerdsen_ai_server.engine import dtype
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.formats.safetensors import tokenizer_bytes
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR

STORED_BYTES = 115_156_224  # the default model's 4-bit weights, scales and biases as stored (group 32)
FP32_BYTES = 538_060_032  # the same dequantized to float32 (tests/api/test_models.py)
FP32_KV_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # 30 layers, 3 KV heads of 64, K and V, float32
BUDGET = 600_000_000  # the float32 weights fit, not with their KV cache at the trained 8,192 tokens


@pytest.fixture(scope="module")
def engine() -> Iterator[InferenceEngine]:
    eng = InferenceEngine(EngineOptions(TEST_MODELS_DIR, max_queue=4, backend="mlx", memory_budget=BUDGET))
    eng.start()
    eng.load_model(DEFAULT_MODEL).result(timeout=300)
    yield eng
    eng.shutdown()


def test_a_quantized_model_that_would_not_fit_as_float32_stays_quantized_and_generates(
    engine: InferenceEngine,
) -> None:
    resident = engine.registry.get(DEFAULT_MODEL)
    assert resident is not None and resident.compute is not None
    assert resident.compute.dtype == dtype.QUANTIZED_FLOAT32 == resident.compute.name
    assert "over the 0.56 GiB budget left" in resident.compute.reason, resident.compute.reason
    loaded = resident.loaded
    path = Path(loaded.path)
    tokenizer = tokenizer_bytes(path)  # charged with the weights
    assert loaded.nbytes == STORED_BYTES + tokenizer  # stays 4-bit (its scales float32 already)
    assert engine.registry.loader.estimate_bytes(path, dtype.QUANTIZED_FLOAT32) == loaded.nbytes
    assert engine.registry.loader.estimate_bytes(path, "float32") == FP32_BYTES + tokenizer
    stream = engine.submit(
        GenerationRequest(DEFAULT_MODEL, [1, 504, 3458, 28], max_tokens=6, sampling=SamplingParams(temperature=0))
    )
    events = list(stream)
    assert events[-1].error is None and sum(len(e.token_ids) for e in events) == 6


def test_float32_where_weights_and_kv_cache_fit_and_the_setting_forces(engine: InferenceEngine) -> None:
    registry = engine.registry
    path = Path(registry.get(DEFAULT_MODEL).loaded.path)  # type: ignore[union-attr]
    assert dtype.kv_bytes_per_token(path, 4) == FP32_KV_PER_TOKEN
    budget = registry.budget_bytes
    try:
        registry.budget_bytes = 2 << 30  # 2 GiB: the float32 weights (0.50 GiB) and KV cache (0.35 GiB) fit
        choice = registry.choose_dtype(path, model_id=DEFAULT_MODEL)
        assert choice.dtype == "float32" and "fits the 2.00 GiB budget left" in choice.reason, choice.reason
        for setting, forced in (("stored", None), ("bfloat16", "bfloat16"), ("float32", "float32")):
            registry.compute_setting = setting
            registry.budget_bytes = BUDGET if forced == "float32" else 2 << 30  # forced even where it does not fit
            assert registry.choose_dtype(path, model_id=DEFAULT_MODEL) == dtype.DtypeChoice(
                forced, f"IMPETUS_COMPUTE_DTYPE={setting}"
            )
    finally:
        registry.budget_bytes, registry.compute_setting = budget, "auto"


def test_a_gpu_keeps_the_stored_weights_and_a_bad_setting_is_refused() -> None:
    def pick(setting: str) -> dtype.DtypeChoice:
        return dtype.choose(
            setting, fp32_bytes=1, kv_fp32_bytes_per_token=1, context=1, room_bytes=1 << 40, on_cpu=False
        )

    assert pick("auto").dtype is None and "GPU" in pick("auto").reason
    assert pick("float16").dtype == "float16"
    with pytest.raises(ValueError, match="IMPETUS_COMPUTE_DTYPE must be one of"):
        pick("int4")


def test_kept_quantized_weights_get_float32_scales_and_the_estimate_holds(tmp_path: Path) -> None:
    """mlx-community's 4-bit repos store bfloat16 scales, with which MLX's CPU quantized matmul is ~7x
    slower: kept quantized, every float tensor is float32 (and counted so), the packed weights as stored."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import convert

    from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
    from gerdsen_ai_server.engine.formats.safetensors import flat_parameters
    from tests.support.tiny_models import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny", TEST_MODELS_DIR / DEFAULT_MODEL)
    convert(str(tiny), str(tmp_path / "q4"), quantize=True, q_group_size=64, q_bits=4, dtype="bfloat16")
    factory = LoaderFactory()
    stored = factory.estimate_bytes(tmp_path / "q4", None)
    loaded = factory.load(str(tmp_path / "q4"), tmp_path, dtype.QUANTIZED_FLOAT32, trusted=True)
    params = dict(flat_parameters(loaded.model))
    assert {a.dtype for a in params.values()} == {mx.uint32, mx.float32}
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in loaded.model.named_modules())
    assert loaded.nbytes == factory.estimate_bytes(tmp_path / "q4", dtype.QUANTIZED_FLOAT32) > stored
