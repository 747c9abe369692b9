"""Fixtures for the model-loading tests: the embedded default model, converted once per session."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from gerdsen_ai_server.engine.formats.gguf import ensure_default_model
from gerdsen_ai_server.store.default_model import default_gguf_path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def converted_default(models_dir: Path) -> Path:
    """The default model converted into a fresh session folder (about a second)."""
    return ensure_default_model(models_dir)


@pytest.fixture(scope="session")
def default_mlx(converted_default: Path) -> tuple[Any, Any]:
    import mlx_lm

    return mlx_lm.load(str(converted_default))


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


@pytest.fixture
def make_gguf(tmp_path: Path):
    def make(name: str, metadata: dict[str, str], tensors: Tensors) -> Path:
        return write_gguf(tmp_path / name, metadata, tensors)

    return make
