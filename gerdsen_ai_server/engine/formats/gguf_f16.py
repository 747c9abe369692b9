"""The embedded default model as an f16 GGUF, for llama.cpp under IMPETUS_BACKEND=auto (written once).

Why not the shipped Q4_1 file as is (what IMPETUS_BACKEND=llamacpp runs): llama.cpp's Q4_1 kernels
round the activations to 8 bits (Q8_1) before each dot product, and on this 135M model that turns
the README's greedy answer to "What is the capital of France?" from "The capital of France is
Paris." into "L'Étoile, la Cité, ..." (docs/llamacpp.md). The same weights dequantized to f16
answer as MLX does (MLX dequantizes them to fp32 on a CPU) and decode at about 0.8x the Q4_1 speed
on llama.cpp (measured: 67 vs 81 tok/s one stream, one thread, 2-core EPYC; f32 24 tok/s, MLX
12 tok/s). llama.cpp's own converter keeps the same tensor names and metadata for an f16 file
(``convert_hf_to_gguf.py --outtype f16``); so do we: MLX's GGUF reader and writer, no new dependency.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.formats.gguf import CONVERTED_DIR
from gerdsen_ai_server.engine.formats.gguf import _exclusive as exclusive  # its flock, shared
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID, default_gguf_path
from gerdsen_ai_server.store.errors import ModelLoadError

GGML_FTYPE_MOSTLY_F16 = 1  # general.file_type of an f16 file (llama.cpp's LLAMA_FTYPE_MOSTLY_F16)
GROUP = 32  # elements per block of Q4_0 / Q4_1 / Q8_0, as mx.load reads them


def default_f16_path(models_dir: Path) -> Path:
    return Path(models_dir) / CONVERTED_DIR / f"{DEFAULT_MODEL_ID}-f16.gguf"


def ensure_default_f16(models_dir: Path) -> Path:
    """``models_dir/.impetus/converted/smollm2-135m-instruct-f16.gguf``, written the first time
    (under a lock, then renamed into place: two servers starting together write it once, and a
    killed write leaves no half file behind)."""
    out = default_f16_path(models_dir)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.with_name(f".{out.name}.lock")):
        if out.is_file():
            return out
        fd, staging = tempfile.mkstemp(
            prefix=f".{out.name}.", suffix=".tmp.gguf", dir=out.parent
        )  # MLX adds .gguf otherwise
        os.close(fd)
        try:
            write_f16(default_gguf_path(), Path(staging))
            os.chmod(staging, 0o644)  # mkstemp makes it 0600; the server user must read it
            os.replace(staging, out)
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot write the default model's f16 GGUF: {type(exc).__name__}: {exc}") from exc
        finally:
            Path(staging).unlink(missing_ok=True)
    return out


def write_f16(source: Path, out: Path) -> None:
    """``source`` (Q4_0 / Q4_1 / Q8_0 / f16 / f32 tensors) as ``out``: matrices dequantized to f16,
    vectors (norms) f32 as llama.cpp wants them, the metadata as it was but for the file type."""
    import mlx.core as mx

    with tempfile.TemporaryDirectory() as scratch:
        # MLX's GGUF reader maps the file read-write: a read-only site-package needs a copy.
        copy = Path(scratch) / "source.gguf"
        shutil.copyfile(source, copy)
        loaded: tuple[dict[str, Any], dict[str, Any]] = mx.load(str(copy), format="gguf", return_metadata=True)  # type: ignore[assignment]
        tensors, metadata = loaded
        weights: dict[str, Any] = {}
        for name, value in tensors.items():
            if name.endswith((".scales", ".biases")):
                continue
            base = name.removesuffix(".weight")
            if f"{base}.scales" in tensors:  # a quantized matrix: packed uint32 + per-block scale and min
                scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
                bits = value.shape[-1] * 32 // (scales.shape[-1] * GROUP)
                value = mx.dequantize(value, scales, biases, group_size=GROUP, bits=bits)
            weights[name] = value.astype(mx.float16 if value.ndim >= 2 else mx.float32)
        metadata["general.file_type"] = mx.array(GGML_FTYPE_MOSTLY_F16, dtype=mx.uint32)
        mx.save_gguf(str(out), weights, metadata)
