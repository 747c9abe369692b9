"""MLX / Hugging Face safetensors folders: the memory they will take, and loading them in steps.

``estimate_bytes`` reads the safetensors headers alone (the registry reserves it in the memory
budget before loading); ``load_steps`` maps the weights lazily and evaluates them a bounded piece
per step, converting their dtype on the way, so the engine thread can interleave a load with
decoding (loaders.py). Everything that touches MLX runs on the engine thread; the tokenizer loads
on a helper thread, which never touches MLX.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

from gerdsen_ai_server.engine.formats.context import from_folder
from gerdsen_ai_server.store.errors import ModelLoadError
from gerdsen_ai_server.store.formats import SAFETENSORS_DTYPE_BYTES

# Quantized layers kept, every float tensor (scales, biases, norms) in float32: MLX's CPU quantized
# matmul is ~7x slower with bfloat16 scales (0.41 vs 2.2-2.8 tok/s, bench/quant_dtype.py).
QUANTIZED_FLOAT32 = "quantized-float32"
_FLOATS = ("F16", "BF16", "F32")


def estimate_bytes(path: Path, compute_dtype: str | None) -> int:
    """Memory the weights will take once loaded, from the safetensors headers alone (exactly what
    MLX holds for them after the load: bench/quant_dtype.py compares the two).

    Quantized weights that will be dequantized to float32 count at 4 bytes per parameter
    (each scale stands for ``group_size`` parameters, whatever the layer's bit width); under
    ``quantized-float32`` they stay as stored and every float tensor counts at 4 bytes.
    """
    config = json.loads((path / "config.json").read_text())
    group_size = (config.get("quantization") or {}).get("group_size", 64)
    tensors: dict[str, tuple[str, int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                tensors[name] = (info["dtype"], math.prod(info["shape"]))
    total = 0
    for name, (dtype, count) in tensors.items():
        stored = count * SAFETENSORS_DTYPE_BYTES.get(dtype, 4)
        if compute_dtype == QUANTIZED_FLOAT32:
            total += count * 4 if dtype in _FLOATS else stored
        elif compute_dtype != "float32":
            total += stored
        elif name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in tensors:
            continue  # folded into the weights when dequantized
        elif dtype == "U32" and (scales := tensors.get(name.rsplit(".", 1)[0] + ".scales")):
            total += scales[1] * group_size * 4  # one fp32 parameter per quantized element
        else:
            total += count * 4
    return total


# A loaded tokenizer's memory (the Hugging Face fast tokenizer and mlx-lm's wrapper), measured as the RSS a
# load adds beyond the weights (bench/quant_dtype.py): about 8 MB plus 8x its files' size (25-45 MB for
# SmolLM2's 49k vocabulary, 8-10 MB for the bench model's 2k). Charged with the weights, so the registry's
# estimate is within 10 % of the RSS a load adds for small models too (docs/performance.md).
TOKENIZER_BASE_BYTES = 8 << 20
TOKENIZER_FILE_FACTOR = 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def tokenizer_bytes(path: Path) -> int:
    """Memory the folder's tokenizer takes once loaded: ``TOKENIZER_BASE_BYTES`` plus
    ``TOKENIZER_FILE_FACTOR`` times the size of its files."""
    files = sum((path / name).stat().st_size for name in TOKENIZER_FILES if (path / name).is_file())
    return TOKENIZER_BASE_BYTES + TOKENIZER_FILE_FACTOR * files


def _load_error(path: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot load model from {path}: {type(exc).__name__}: {exc}")


def load_steps(path: Path, compute_dtype: str | None, chunk_bytes: int) -> Generator[None, None, tuple[Any, Any]]:
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        # A local path: nothing here goes to the Hugging Face hub.
        model, config = load_model(path, lazy=True)
    except Exception as exc:  # anything (bad config, unreadable weights, missing tensors) is a load error
        raise _load_error(path, exc) from exc
    result: dict[str, Any] = {}

    def load_tok() -> None:  # tokenizers and transformers only: no MLX on this thread
        try:
            result["tokenizer"] = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        except Exception as exc:
            result["error"] = exc

    helper = threading.Thread(target=load_tok, name="impetus-tokenizer-load", daemon=True)
    helper.start()
    try:
        yield from _materialize(model, compute_dtype, chunk_bytes)
    except Exception as exc:  # a truncated file fails here, when its bytes are read
        raise _load_error(path, exc) from exc
    while helper.is_alive():  # on a failure above it finishes alone: a daemon, holding nothing
        helper.join(0.005)
        yield
    if "error" in result:
        raise _load_error(path, result["error"]) from result["error"]
    return model, result["tokenizer"]


def _materialize(model: Any, compute_dtype: str | None, chunk_bytes: int) -> Generator[None, None, None]:
    """Evaluate a lazily loaded model's weights, converted to ``compute_dtype``, one bounded piece per step.

    The same result as ``dequantize_model`` (float32 only) + ``set_dtype`` + ``mx.eval``: the stored
    tensors are read a few at a time, then each converted tensor is computed in row blocks into
    its buffer (MLX updates the buffer in place, as nothing else holds it).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import dequantize_model

    group: list[Any] = []
    for _, array in flat_parameters(model):
        group.append(array)
        if sum(a.nbytes for a in group) >= chunk_bytes:
            mx.eval(group)
            group = []
            yield
    if group:
        mx.eval(group)
        yield
    if compute_dtype is None:
        return
    dtype = mx.float32 if compute_dtype == QUANTIZED_FLOAT32 else getattr(mx, compute_dtype)
    if compute_dtype == "float32":
        quantized = {
            name: (m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
            for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
        }
        dequantize_model(model)  # new float modules, their weights still lazy (never evaluated)
        modules = dict(model.named_modules())
        for name, (w, scales, biases, group_size, bits, mode) in quantized.items():

            def dequantized(
                rows: slice,
                w: Any = w,
                scales: Any = scales,
                biases: Any = biases,
                group_size: int = group_size,
                bits: int = bits,
                mode: str = mode,
            ) -> Any:
                return mx.dequantize(
                    w[rows], scales[rows], None if biases is None else biases[rows], group_size, bits, mode
                ).astype(dtype)

            modules[name].weight = yield from _in_row_blocks(
                dequantized, modules[name].weight.shape, dtype, chunk_bytes
            )
    converted = []
    for name, array in flat_parameters(model):
        if mx.issubdtype(array.dtype, mx.floating) and array.dtype != dtype:
            converted.append(
                (
                    name,
                    (
                        yield from _in_row_blocks(
                            lambda rows, a=array: a[rows].astype(dtype), array.shape, dtype, chunk_bytes
                        )
                    ),
                )
            )
    if converted:
        model.update(tree_unflatten(converted))


def _in_row_blocks(compute: Any, shape: tuple[int, ...], dtype: Any, chunk_bytes: int) -> Generator[None, None, Any]:
    """``compute(slice(None))``, evaluated a block of leading-axis rows per step."""
    import mlx.core as mx

    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * dtype.size)
    per_step = max(1, chunk_bytes // row_bytes)
    if rows <= per_step or not shape:
        out = compute(slice(None))
        mx.eval(out)
        yield
        return out
    # Allocating (and first touching) the whole buffer is itself one step.
    out = mx.zeros(shape, dtype=dtype)
    mx.eval(out)
    yield
    for start in range(0, rows, per_step):
        out[start : start + per_step] = compute(slice(start, start + per_step))
        mx.eval(out)
        yield
    return out


def flat_parameters(model: Any) -> list[tuple[str, Any]]:
    """The model's (dotted name, array) pairs: ``tree_flatten``'s list (its hint adds the dict it fills
    when given a ``destination``, which we never pass)."""
    from mlx.utils import tree_flatten

    return cast(list[tuple[str, Any]], tree_flatten(model.parameters()))


def parameter_nbytes(model: Any) -> int:
    return sum(v.nbytes for _, v in flat_parameters(model))


def context_length(path: Path) -> int:
    """The model's trained context from config.json, or 2048 when it does not say (formats/context.py)."""
    return from_folder(path).trained
