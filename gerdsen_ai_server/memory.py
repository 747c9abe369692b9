"""The C allocator under MLX: what it holds, and making it give freed buffers back (glibc only).

On CPU, MLX allocates every array buffer with ``malloc``. glibc raises its mmap threshold
(dynamically, up to 32 MiB) each time a large mapped block is freed, so after the first steps the
KV-cache and activation buffers of a batch (from a few hundred KiB to a few MiB) come from the
heap arenas instead, and freed arena memory goes back to the kernel only when it lies at the top
of a heap. Measured in a 6-minute soak (docs/reliability.md): MLX's active and cached buffers,
the prompt cache and Python's object count all flat after 100 s while the bytes glibc kept free
grew 160 -> 410 MiB, and RSS with them (+16 %). Fixing the threshold (``mallopt``, which also
turns the dynamic raise off) makes every block at or above it its own mapping, returned when
freed: the kept-free bytes stayed under 35 MiB. Reuse stays cheap because MLX keeps its own
bounded cache of freed buffers (IMPETUS_MLX_CACHE_LIMIT).

What stays in the heap (blocks under the threshold) is spread over one arena per thread that
ever allocated, up to 8 per core, and Gunicorn runs 64 request threads: each arena keeps its own
free scraps, which crept 49 -> 85 MiB over the last 400 s of a 10-minute soak. ``set_arena_max``
makes the threads share a few arenas (MALLOC_ARENA_MAX, a usual setting for threaded servers).

Elsewhere (macOS, musl) these are no-ops and ``malloc_info`` is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33 (no mallinfo2)
        return None


_LIBC = _glibc()


def malloc_info() -> dict[str, int] | None:
    """Bytes the C heap has in use (heap arenas + own mappings) and holds free in its arenas."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"in_use_bytes": info.uordblks + info.hblkhd, "free_bytes": info.fordblks,
            "arena_bytes": info.arena, "mmap_bytes": info.hblkhd}


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve blocks of ``nbytes`` (at most 32 MiB) or more from their own mappings; False if not applied
    (0: glibc's dynamic default is left alone)."""
    if _LIBC is None or nbytes <= 0:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, nbytes))



def set_arena_max(arenas: int) -> bool:
    """Share at most ``arenas`` heaps among all threads (0: glibc's default, 8 per core); False if not applied."""
    if _LIBC is None or arenas <= 0:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, arenas))
