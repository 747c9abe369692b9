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

jemalloc, where installed (Debian/Ubuntu ``libjemalloc2``), is the better trade and the default
on Linux: ``impetus serve`` preloads it (``allocator_env``, IMPETUS_MALLOC). Freed pages stay with
it, dirty, for a second (``dirty_decay_ms:1000``; jemalloc's default is ten) and are reused
first, then a background thread gives them back, so RSS levels off like the fixed threshold's
without its cost: every block the threshold maps afresh is faulted in page by page,
20,000-220,000 minor faults per 1,024 tokens at 8 streams, 12-30 % of the throughput
(docs/performance.md). ``oversize_threshold:0``
keeps large blocks out of jemalloc's oversize arena, which returns them at once (the same faults).

Elsewhere (macOS, musl) these are no-ops and ``malloc_info`` is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

from gerdsen_ai_server.runtime.blas import find_system_library

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Debian/Ubuntu multiarch layout of libjemalloc2, e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
JEMALLOC_GLOBS = ("/usr/lib/*/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2")
# Background purging (off the engine thread); no oversize arena (it unmaps large blocks at once); freed
# pages unused for 1 s given back (jemalloc's default, 10 s, let 10-minute soaks peak at +7.5 % on a
# burst of freed pages; 1 s: +1.6 %, and the same 8-stream throughput: decode re-uses its buffers every step).
JEMALLOC_CONF = "background_thread:true,oversize_threshold:0,dirty_decay_ms:1000"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


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


def _jemalloc_mallctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """jemalloc's ``mallctl`` when jemalloc is this process's malloc (preloaded), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallctl = ctypes.CDLL(None).mallctl  # the global namespace: the preloaded library's symbols
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


_MALLCTL = _jemalloc_mallctl()


def allocator() -> str:
    """The C allocator under MLX in this process: 'jemalloc', 'glibc' or 'system' (anything else)."""
    return "jemalloc" if _MALLCTL is not None else "glibc" if _LIBC is not None else "system"


def _jemalloc_stat(name: str) -> int:
    value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    ok = _MALLCTL(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0  # type: ignore[misc]
    return value.value if ok else 0


def malloc_info() -> dict[str, int] | None:
    """Bytes the C heap has in use (heap arenas + own mappings) and holds free in its arenas.

    Under jemalloc: bytes handed out, and the rest of what it keeps resident (freed pages not yet
    given back, its own metadata)."""
    if _MALLCTL is not None:
        epoch = ctypes.c_uint64(1)  # refresh jemalloc's cached statistics
        _MALLCTL(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
        allocated, resident = _jemalloc_stat("stats.allocated"), _jemalloc_stat("stats.resident")
        return {
            "in_use_bytes": allocated,
            "free_bytes": max(resident - allocated, 0),
            "arena_bytes": _jemalloc_stat("stats.mapped"),
            "mmap_bytes": 0,
        }
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {
        "in_use_bytes": info.uordblks + info.hblkhd,
        "free_bytes": info.fordblks,
        "arena_bytes": info.arena,
        "mmap_bytes": info.hblkhd,
    }


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


def find_jemalloc() -> Path | None:
    """Path of an installed jemalloc shared library, or None (always None off Linux)."""
    return find_system_library(JEMALLOC_GLOBS)


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """Return a copy of ``env`` set up to preload jemalloc (IMPETUS_MALLOC 'auto' or 'jemalloc', when installed).

    Sets ``IMPETUS_ALLOCATOR`` to what the server will run on: 'jemalloc' or 'glibc' (Linux), or
    'system'. Raises ValueError for IMPETUS_MALLOC=jemalloc where it is not installed."""
    env = dict(env)
    choice = env.get("IMPETUS_MALLOC") or "auto"  # validated by Settings before this is called
    preload = env.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        env["IMPETUS_ALLOCATOR"] = "jemalloc"
        return env
    lib = find_jemalloc() if choice in ("auto", "jemalloc") else None
    if lib is None:
        if choice == "jemalloc":
            raise ValueError("IMPETUS_MALLOC=jemalloc, but jemalloc is not installed (Debian/Ubuntu: libjemalloc2)")
        env["IMPETUS_ALLOCATOR"] = "glibc" if sys.platform.startswith("linux") else "system"
        return env
    env["LD_PRELOAD"] = f"{preload}:{lib}" if preload else str(lib)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env["IMPETUS_ALLOCATOR"] = "jemalloc"
    return env
