"""llama.cpp slots to and from the prompt cache's disk tier: llama-server's slot save and restore, automatic.

A sequence that finishes leaves its KV cells in its slot (llamacpp.py); ``save`` copies them out
(``llama_state_seq_get_data``: a memcpy on the backend's thread, ~23 KB a token for the default
model at f16) and the disk tier's writer thread writes them, as one byte tensor in a safetensors
file under the same header as an MLX entry (prompt_cache_format.py). When a prompt is put into a
slot whose own cells share less of it than a file does, ``restore`` loads that file into the slot
(``llama_state_seq_set_data``); the slot then keeps the prefix it shares with the prompt, as for
its own cells. llama-server does the same on request (``POST /slots/{id}?action=save|restore``,
``--slot-save-path``); here it is the disk tier's write-through and lookup. A state llama.cpp
refuses (another context layout) deletes the file. The key's dtype is "gguf" and its KV bits the
cache type (0 f16, 8 q8_0, 4 q4_0): a file is never read into a context of another type.
"""

from __future__ import annotations

import ctypes
import json
import logging
import struct
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.backends.llamacpp_slots import common_prefix
from gerdsen_ai_server.engine.prompt_cache_disk import DISK_MIN_GAIN, DiskTier
from gerdsen_ai_server.engine.prompt_cache_format import TierKey, metadata

log = logging.getLogger(__name__)

TENSOR = "llama_state"  # the one tensor of a llama.cpp file: the sequence's state, as bytes


def write_state(path: str, blob: bytes | memoryview, header: dict[str, str]) -> None:
    """A safetensors file of one U8 tensor (``blob``) and ``header`` under "0." as an MLX entry's."""
    meta = {f"0.{k}": v for k, v in header.items()}
    head = json.dumps(
        {"__metadata__": meta, TENSOR: {"dtype": "U8", "shape": [len(blob)], "data_offsets": [0, len(blob)]}}
    )
    encoded = head.encode() + b" " * (-len(head.encode()) % 8)  # the data 8-byte aligned, as safetensors writers do
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.write(blob)


def read_state(path: Path) -> bytes:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        start, end = header[TENSOR]["data_offsets"]
        f.seek(8 + length + start)
        blob = f.read(end - start)
    if len(blob) != end - start:
        raise ValueError("truncated state")
    return blob


class SlotFiles:
    """One llama.cpp context's slots, saved to and restored from the disk tier (the backend's thread)."""

    def __init__(self, lc: Any, ctx: Any, mem: Any, disk: DiskTier, key: TierKey) -> None:
        self._lc, self._ctx, self._mem = lc, ctx, mem
        self.disk = disk
        self.key = key

    def save(self, seq_id: int, tokens: list[int]) -> None:
        """Queue the KV cells of ``seq_id`` (holding ``tokens``) for the writer thread; never raises
        (the backend's thread must go on)."""
        try:
            self._save(seq_id, tokens)
        except Exception:
            log.exception("prompt cache: slot %d not saved", seq_id)
            self.disk.skipped += 1

    def restore(self, seq_id: int, prompt: list[int], held: list[int]) -> list[int]:
        """The tokens slot ``seq_id`` holds for ``prompt``: ``held`` (its own cells), or those of the
        file covering more of the prompt, loaded into it (none, when llama.cpp refused that file)."""
        try:
            return self._restore(seq_id, prompt, held)
        except Exception:  # the slot's cells are unknown now: empty it
            log.exception("prompt cache: slot %d not restored", seq_id)
            self._lc.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            return []

    def _save(self, seq_id: int, tokens: list[int]) -> None:
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2 or self.disk.known(self.key, tokens):
            return
        size = int(self._lc.llama_state_seq_get_size(self._ctx, seq_id))
        if not size or self.disk.full(size):
            return
        buffer = (ctypes.c_uint8 * size)()
        written = int(self._lc.llama_state_seq_get_data(self._ctx, buffer, size, seq_id))
        if not written:
            self.disk.skipped += 1
            return
        blob = memoryview(buffer)[:written]  # no copy: the writer thread writes the buffer itself
        header = metadata(self.key, tokens, "gguf")
        self.disk.submit(self.key, tokens, written, lambda path: write_state(path, blob, header), True)

    def _restore(self, seq_id: int, prompt: list[int], held: list[int]) -> list[int]:
        have = common_prefix(held, prompt)
        found = self.disk.best(self.key, prompt)
        if found is None or found[1] - have < DISK_MIN_GAIN:
            if have == 0:
                self.disk.misses += 1
            return held
        read = self.disk.open(self.key, found[0], lambda path, meta, tokens: read_state(path))
        if read is None:
            return held
        blob, tokens = read
        self._lc.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        source = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if not self._lc.llama_state_seq_set_data(self._ctx, source, len(blob), seq_id):
            self._lc.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            self.disk.reject(found[0])
            return []
        self.disk.hits += 1
        return tokens
