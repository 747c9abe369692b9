"""Which GGUFs llama.cpp serves (IMPETUS_BACKEND), and the memory one of its models reserves.

Read before a load, without llama.cpp: the loaders ask ``serves_gguf`` where a GGUF goes, the
registry reserves ``estimate_bytes`` in the memory budget while it loads (llamacpp.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.store.errors import ModelLoadError


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def serves_gguf(is_default_model: bool, setting: str) -> bool:
    """Whether a GGUF goes to llama.cpp (True) or is converted to MLX (False), by IMPETUS_BACKEND."""
    if setting == "llamacpp":
        if not available():
            raise ModelLoadError(
                "IMPETUS_BACKEND=llamacpp but llama-cpp-python is not installed (make setup installs it)"
            )
        return True
    if setting == "mlx":
        return False
    return not is_default_model and available()


def kv_bytes(meta: dict[str, Any], cells: int) -> int:
    """The KV cache of ``cells`` tokens in all (f16 K and V): a llama.cpp model reserves one slot's
    context per sequence, ``IMPETUS_MAX_BATCH`` x the effective context length (llamacpp.py)."""
    arch = meta.get("general.architecture", "llama")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta.get(f"{arch}.embedding_length", 0)) // heads))
    return 2 * 2 * layers * kv_heads * head_dim * cells


def estimate_bytes(path: Path, n_seq: int, context: int) -> int:
    """What the registry reserves for a GGUF: the file (its weights) plus the KV cache of ``n_seq``
    slots of ``context`` tokens each."""
    return path.stat().st_size + kv_bytes(read_gguf_header(path).metadata, n_seq * context)
