"""The prompt cache's disk files: their key (model, weights fingerprint, dtype, KV bits), header and checks.

A file is mlx-lm's prompt-cache format (``save_prompt_cache``: safetensors, the cache classes and
scalars in the header under "1." and "2.") with our metadata under "0." (``metadata``), or, for a
llama.cpp sequence, one byte tensor under the same metadata (backends/llamacpp_state.py).
``read_header`` checks a file is whole before anything reads its arrays.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache

FORMAT = "impetus-prompt-cache/1"
SUFFIX = ".safetensors"
_EDGE = 1 << 20  # the weights fingerprint hashes each weight file's first and last MiB
_MAX_HEADER = 64 << 20  # a safetensors header larger than this is not one of ours


@dataclass(frozen=True)
class TierKey:
    """What a disk entry must match to be read: the model, its weights, the compute dtype, the KV bits."""

    model_id: str
    weights: str  # weights_fingerprint of the model's files
    dtype: str  # the dtype its KV cache computes in (float32, float16, bfloat16)
    kv_bits: int  # 0: unquantized

    @property
    def digest(self) -> str:
        fields = json.dumps([self.model_id, self.weights, self.dtype, self.kv_bits])
        return hashlib.sha256(fields.encode()).hexdigest()[:24]


def weights_fingerprint(path: Path) -> str:
    """A cheap, stable hash of a model's files: every file's name, size and mtime, config.json and
    any index whole, and the first and last MiB of each weight file (~2 ms a file from the page cache,
    never the whole 2-8 GB). A re-download, conversion or edit changes it; the same files do not."""
    files = (
        [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    )
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with open(file, "rb") as f:
            if file.suffix == ".json" and stat.st_size <= _EDGE:
                digest.update(f.read())
            elif file.suffix in (".safetensors", ".gguf", ".bin", ".npz"):
                digest.update(f.read(_EDGE))
                f.seek(max(0, stat.st_size - _EDGE))
                digest.update(f.read(_EDGE))
    return digest.hexdigest()[:32]


def savable(cache: list[Any]) -> bool:
    """Whether mlx-lm's ``load_prompt_cache`` can rebuild ``cache``: every layer one of mlx-lm's own
    cache classes (it looks classes up by name in its module). A subclass from elsewhere (the
    batched quantized cache's ``QuantizedCache``) is not written."""
    return bool(cache) and all(getattr(mlx_cache, type(c).__name__, None) is type(c) for c in cache)


def tokens_hash(tokens: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32]


def flatten(cache: list[Any], metadata: dict[str, str]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """``save_prompt_cache``'s arrays and header, made here (on the engine thread: the scalars become
    MLX arrays) so the writer thread only writes: the same format, read back by ``load_prompt_cache``."""
    scalars: list[Any] = [""]
    arrays: dict[str, mx.array] = {}
    flat: list[tuple[str, Any]] = tree_flatten([c.state for c in cache])  # type: ignore[assignment]
    for name, data in flat:
        if isinstance(data, mx.array):
            arrays[name] = data
        elif isinstance(data, (bool, int, float)):
            scalars.append((name, "scalar"))
            arrays[name] = mx.array(data)
        elif data is None:
            scalars.append((name, "none"))
            arrays[name] = mx.array([])
        else:
            raise ValueError(f"unserializable cache state: {type(data).__name__}")
    header = dict(tree_flatten([metadata, [type(c).__name__ for c in cache], scalars]))
    return arrays, header


def metadata(key: TierKey, tokens: list[int], kv_dtype: str) -> dict[str, str]:
    """A file's header: what it was made for, and its tokens."""
    return {
        "format": FORMAT,
        "key": key.digest,
        "model_id": key.model_id,
        "weights": key.weights,
        "dtype": key.dtype,
        "kv_bits": str(key.kv_bits),
        "kv_dtype": kv_dtype,
        "tokens": json.dumps(tokens, separators=(",", ":")),
        "tokens_sha256": tokens_hash(tokens),
    }


def read_header(path: Path) -> dict[str, str]:
    """The file's metadata, after checking that it is a whole safetensors file: its size is the
    header's and every tensor's extent (a truncated file fails here, before MLX reads it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError("bad header length")
        header = json.loads(f.read(length))
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
    if size != 8 + length + end:
        raise ValueError(f"size {size}, header says {8 + length + end}")
    meta = header.get("__metadata__") or {}
    if meta.get("0.format") != FORMAT:
        raise ValueError("not an Impetus prompt-cache file")
    return {k[2:]: v for k, v in meta.items() if k.startswith("0.")}


def check_layers(cache: list[Any], layout: list[str], length: int, kv_dtype: str) -> None:
    """A loaded cache fits the model: its layers' classes are ``layout``, each holds ``length``
    tokens, its K/V arrays have a KV cache's shapes and the dtype written in the header."""
    classes = [type(c).__name__ for c in cache]
    if classes != layout:
        raise ValueError(f"{len(classes)} layers of {sorted(set(classes))}, the model has {len(layout)}")
    for layer in cache:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, mx.array) and isinstance(values, mx.array):
            if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3] or keys.shape[0] != 1:
                raise ValueError(f"keys {keys.shape} and values {values.shape} do not make a KV cache")
            if keys.shape[2] < layer.offset or str(keys.dtype) != kv_dtype:
                raise ValueError("arrays shorter than the offset, or of another dtype")
        if hasattr(layer, "offset") and layer.offset != length:
            raise ValueError(f"offset {layer.offset} for {length} tokens")
