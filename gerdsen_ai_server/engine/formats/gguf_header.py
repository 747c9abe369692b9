"""Read a GGUF file's header: its metadata and tensor table, as plain Python values.

The header is parsed in Python, before MLX's C++ reader or llama.cpp sees the file: it gives clear
errors (truncated file, unknown version, implausible counts) and the metadata the conversion to MLX
(gguf.py) and the llama.cpp backend (its context and KV size, its tokenizer) read.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gerdsen_ai_server.store.errors import ModelLoadError, UnsupportedModelFormat

# ggml tensor type id -> (name, elements per block, bytes per block).
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
# GGUF metadata value type id -> struct format (8 = string, 9 = array).
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensor_types: dict[str, str] = field(default_factory=dict)


class _Truncated(Exception):
    pass


class _Reader:
    """Bounds-checked cursor over the mmapped file: a corrupt length never reads past the end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise ModelLoadError(f"unknown GGUF metadata type {vtype}")
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if count * (8 if etype == 8 else 1) > self.size - self.pos:
            raise _Truncated  # each element needs at least that many bytes
        if etype == 8:
            return [self.string() for _ in range(count)]
        if etype not in _SCALAR_FMT:
            raise ModelLoadError(f"unsupported GGUF metadata array type {etype}")
        dtype = np.dtype(_SCALAR_FMT[etype])
        start = self.take(count * dtype.itemsize)
        return np.frombuffer(self.buf, dtype, count, start).tolist()


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse metadata and tensor table; raise ModelLoadError if the file is not a whole GGUF."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(_Reader(buf), path)
    except _Truncated:
        raise ModelLoadError(f"{path} is truncated or corrupt (incomplete download?)") from None
    except (OSError, ValueError) as exc:  # empty file (mmap ValueError), unreadable file
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc


def _parse_header(r: _Reader, path: Path) -> GGUFHeader:
    if r.size < 24 or r.buf[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
    r.take(4)
    version = r.unpack("<I")
    if version not in (2, 3):
        raise UnsupportedModelFormat(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelLoadError(f"{path} is corrupt (implausible header counts)")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name, ndim = r.string(), r.unpack("<I")
        if ndim > 4:
            raise ModelLoadError(f"{path} is corrupt (tensor {name!r} has {ndim} dims)")
        dims = [r.unpack("<Q") for _ in range(ndim)]
        infos.append((name, dims, r.unpack("<I"), r.unpack("<Q")))
    align = int(metadata.get("general.alignment", 32)) or 32
    data_start = -(-r.pos // align) * align
    header = GGUFHeader(version, metadata)
    for name, dims, ttype, offset in infos:
        tname, block, nbytes = _GGML_TYPES.get(ttype, (f"type {ttype}", 0, 0))
        header.tensor_types[name] = tname
        if block and data_start + offset + math.prod(dims) // block * nbytes > r.size:
            raise _Truncated
    return header
