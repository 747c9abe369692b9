"""Which GGUFs llama.cpp serves (IMPETUS_BACKEND), and the memory one of its models reserves.

Read before a load, without llama.cpp: the loaders ask ``serves_gguf`` where a GGUF goes, the
registry reserves ``estimate_bytes`` in the memory budget while it loads (llamacpp.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.backends.choice import choose
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.store.errors import ModelLoadError


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def serves_gguf(is_default_model: bool, setting: str) -> bool:
    """Whether a GGUF goes to llama.cpp (True) or is converted to MLX (False), by IMPETUS_BACKEND;
    ``auto`` asks choice.py which backend is faster here."""
    if setting == "llamacpp":
        if not available():
            raise ModelLoadError(
                "IMPETUS_BACKEND=llamacpp but llama-cpp-python is not installed (make setup installs it)"
            )
        return True
    if setting == "mlx":
        return False
    chosen = choose(setting)  # auto: the faster backend on this machine (choice.py says why)
    return (chosen.default_model if is_default_model else chosen.gguf) == "llamacpp"


# KV cache element types by IMPETUS_KV_BITS / a load's kv_bits: (GGML type, bytes per block, elements
# per block). ggml's blocks: f16 2 bytes an element; q8_0 32 int8 + one f16 scale (34 bytes per 32);
# q4_0 32 nibbles + one f16 scale (18 bytes per 32): 0.53x and 0.28x of f16 (llama-server's -ctk/-ctv).
GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0 = 1, 2, 8  # llama_cpp's GGML_TYPE_* (ggml.h)
KV_TYPES: dict[int, tuple[int, int, int]] = {
    0: (GGML_TYPE_F16, 2, 1),
    8: (GGML_TYPE_Q8_0, 34, 32),
    4: (GGML_TYPE_Q4_0, 18, 32),
}
KV_TYPE_NAMES = {0: "f16", 8: "q8_0", 4: "q4_0"}


def kv_bytes(meta: dict[str, Any], cells: int, kv_bits: int = 0) -> int:
    """The KV cache of ``cells`` tokens in all (K and V, f16 or quantized by ``kv_bits``): a llama.cpp
    model reserves one slot's context per sequence, ``IMPETUS_MAX_BATCH`` x the effective context
    length (llamacpp.py). Exactly what llama.cpp allocates for a head size that is a multiple of 32."""
    arch = meta.get("general.architecture", "llama")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta.get(f"{arch}.embedding_length", 0)) // heads))
    _, block_bytes, block = KV_TYPES[kv_bits]
    return 2 * layers * cells * -(-kv_heads * head_dim // block) * block_bytes


def estimate_bytes(path: Path, n_seq: int, context: int, kv_bits: int = 0) -> int:
    """What the registry reserves for a GGUF: the file (its weights) plus the KV cache of ``n_seq``
    slots of ``context`` tokens each."""
    return path.stat().st_size + kv_bytes(read_gguf_header(path).metadata, n_seq * context, kv_bits)
