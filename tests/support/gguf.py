"""Minimal GGUF files written by hand, for the loader's tests of what MLX ships no example of."""

from __future__ import annotations

import struct
from pathlib import Path

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
