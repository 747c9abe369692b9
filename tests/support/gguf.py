"""GGUF files the tests build: minimal ones written by hand (for what MLX ships no example of) and a tiny
random llama as llama.cpp loads it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tests.support import TEST_MODELS_DIR
from tests.support.models import cache_lock

Tensors = dict[str, tuple[int, int, bytes]]


def write_gguf(path: Path, metadata: dict[str, str], tensors: Tensors) -> Path:
    """A minimal GGUF v3 file: string metadata, 1-D tensors ``name -> (ggml type, n_elements, raw bytes)``.

    Lets tests build files with architectures or tensor types MLX does not ship examples of.
    """

    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += string(key) + struct.pack("<I", 8) + string(value)
    offset, blobs = 0, []
    for name, (ggml_type, n_elements, blob) in tensors.items():
        out += string(name) + struct.pack("<IQIQ", 1, n_elements, ggml_type, offset)
        offset += -(-len(blob) // 32) * 32
        blobs.append(blob.ljust(-(-len(blob) // 32) * 32, b"\0"))
    out += b"\0" * (-len(out) % 32)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path


def build_tiny_gguf(out: Path, tokenizer_from: Path, *, seed: int = 0, context_length: int = 512) -> Path:
    """``out``: a random 2-layer llama, 64 wide, with ``tokenizer_from``'s tokenizer, end and start tokens
    and chat template, trained (says its header) for ``context_length`` tokens, as an f32 GGUF
    (bench/gguf_model.py's writer). Built once into TEST_MODELS_DIR (a stamp beside it), then copied
    to ``out`` (14 MB). Prefills thousands of tokens in well under a second, where the default model
    takes many: for llama.cpp tests whose behaviour does not depend on the weights."""
    import shutil

    from bench.gguf_model import write_gguf
    from tests.support.tiny_models import build_tiny_llama

    cache = TEST_MODELS_DIR / "tiny-gguf"
    built = cache / f"tiny-s{seed}-c{context_length}.gguf"
    stamp = built.with_name(f".{built.name}.json")
    want = json.dumps({"seed": seed, "context_length": context_length, "tokenizer": str(tokenizer_from), "v": 1})
    with cache_lock("tiny-gguf"):
        if not (built.is_file() and stamp.is_file() and stamp.read_text() == want):
            source = build_tiny_llama(cache / f".{built.stem}-mlx", tokenizer_from, seed=seed)
            config = json.loads((source / "config.json").read_text())
            own = json.loads((tokenizer_from / "config.json").read_text())  # the end and start tokens it names
            config.update({k: own[k] for k in ("bos_token_id", "eos_token_id") if k in own})
            config["max_position_embeddings"] = context_length
            (source / "config.json").write_text(json.dumps(config))
            write_gguf(source, built)
            stamp.write_text(want)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out)
    return out


def default_f32_gguf() -> Path:
    """The default model as an f32 GGUF in a folder of its own id (built once, ~540 MB, cached): what the
    llama.cpp tests of tests/api and tests/engine load."""
    from bench.gguf_model import write_gguf
    from tests.support import DEFAULT_MODEL
    from tests.support.models import default_model_folder

    with cache_lock("llamacpp"):
        return write_gguf(
            default_model_folder(), TEST_MODELS_DIR / "llamacpp" / DEFAULT_MODEL / f"{DEFAULT_MODEL}-f32.gguf"
        )
