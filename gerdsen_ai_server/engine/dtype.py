"""The dtype a model computes in, chosen per model and memory: float32 on CPU only where it fits and pays.

Why: on a CPU, MLX's float32 matmuls run on a real BLAS while its quantized kernels do not, so a
dequantized model decodes faster there: 1.1-2.5x the tok/s of the same 4-bit weights (the embedded
default, random llamas of 0.1 and 0.45 B parameters; ``python -m bench.quant_dtype``, figures in
docs/performance.md). But float32 takes 8x the bytes of 4-bit weights: a 4-bit 8B model (4.6 GB on
disk) would need 33 GB and its KV cache, "too big" where the file fits easily. So under
``IMPETUS_COMPUTE_DTYPE=auto`` a model on a CPU computes in float32 only when its float32 weights
plus a float32 KV cache of one sequence at its context length fit the memory budget left beside the
pinned models. Otherwise its quantized weights stay quantized, with their scales, biases and the
other layers in float32 (``quantized-float32``): mlx-community's repos store bfloat16 scales, with
which MLX's CPU quantized matmul is ~7x slower again (0.41 vs 2.8 tok/s), for 1/16 byte more a
parameter. A model that is not quantized keeps its stored dtype when float32 does not fit. On a GPU
weights stay as stored (Metal's and CUDA's quantized kernels are the fast path there).

``IMPETUS_COMPUTE_DTYPE`` set to float32, bfloat16 or float16 forces that dtype for every model;
``stored`` forces the stored weights. Peers: mlx_lm.server computes as stored (its quantized models
with bfloat16 scales on a CPU); llama.cpp keeps a GGUF's quantization and is the faster CPU path,
which the catalogue steers to on a CPU (serving/discover.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from gerdsen_ai_server.engine.formats.safetensors import QUANTIZED_FLOAT32

__all__ = [
    "FORCED",
    "QUANTIZED_FLOAT32",
    "SETTINGS",
    "DtypeChoice",
    "choose",
    "default_compute_dtype",
    "is_quantized",
    "kv_bytes_per_token",
]

FORCED = ("float32", "bfloat16", "float16")
SETTINGS = ("auto", "stored", *FORCED)


@dataclass(frozen=True)
class DtypeChoice:
    """What a load computes in (None: the stored weights) and why, for the load log and /api/models."""

    dtype: str | None
    reason: str

    @property
    def name(self) -> str:
        return self.dtype or "as stored"


def default_compute_dtype(setting: str) -> str | None:
    """The engine-wide preference (what /health reports): 'auto' is float32 on CPU, where a real BLAS
    makes fp32 the fast path, as stored elsewhere; each load then checks that float32 fits (``choose``)."""
    if setting == "stored":
        return None
    if setting != "auto":
        return setting
    return "float32" if mx.default_device() == mx.cpu else None


def _text_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def is_quantized(path: Path) -> bool:
    """Whether the folder's config.json declares quantized weights (mlx-lm's ``quantization``)."""
    config = _text_config(path)
    return bool(config.get("quantization") or config.get("quantization_config"))


def kv_bytes_per_token(path: Path, dtype_bytes: int) -> int:
    """KV-cache bytes one token takes in every layer (K and V), from the folder's config.json; 0 when
    it does not say (an encoder has no KV cache)."""
    config = _text_config(path)
    try:
        heads = int(config["num_attention_heads"])
        dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return 2 * layers * kv_heads * dim * dtype_bytes


def choose(
    setting: str,
    *,
    fp32_bytes: int,
    kv_fp32_bytes_per_token: int,
    context: int,
    room_bytes: int,
    quantized: bool = True,
    on_cpu: bool | None = None,
) -> DtypeChoice:
    """The dtype a load of an MLX model computes in, under ``IMPETUS_COMPUTE_DTYPE=setting``.

    ``fp32_bytes``: its weights in float32 (the registry's estimate for float32);
    ``kv_fp32_bytes_per_token``: its float32 KV cache per token (``kv_bytes_per_token``); ``context``:
    the context length the load gets; ``room_bytes``: the memory budget less what pinned models hold;
    ``quantized``: whether its weights are.
    """
    if setting in FORCED:
        return DtypeChoice(setting, f"IMPETUS_COMPUTE_DTYPE={setting}")
    if setting == "stored":
        return DtypeChoice(None, "IMPETUS_COMPUTE_DTYPE=stored")
    if setting != "auto":
        raise ValueError(f"IMPETUS_COMPUTE_DTYPE must be one of {SETTINGS}, not {setting!r}")
    if not (mx.default_device() == mx.cpu if on_cpu is None else on_cpu):
        return DtypeChoice(None, "auto on a GPU: the stored weights (quantized kernels are the fast path there)")
    need = fp32_bytes + kv_fp32_bytes_per_token * context
    kv = f"the KV cache of {context} tokens" if kv_fp32_bytes_per_token and context else "no KV cache known"
    if need > room_bytes:
        over = (
            f"auto on CPU: float32 would take {need / 2**30:.2f} GiB with {kv}, "
            f"over the {max(room_bytes, 0) / 2**30:.2f} GiB budget left"
        )
        if not quantized:
            return DtypeChoice(None, f"{over}; the stored weights instead")
        return DtypeChoice(
            QUANTIZED_FLOAT32,
            f"{over}; the quantized weights stay quantized, their scales and the other layers in float32 "
            "(MLX's CPU quantized matmul is ~7x slower with bfloat16 scales)",
        )
    return DtypeChoice(
        "float32",
        f"auto on CPU: float32 ({need / 2**30:.2f} GiB with {kv}) fits the "
        f"{room_bytes / 2**30:.2f} GiB budget left and decodes faster than quantized weights on a CPU",
    )
