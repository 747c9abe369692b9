"""Which BLAS MLX's CPU backend runs on (Linux).

The ``mlx[cpu]`` wheel bundles the single-threaded reference BLAS. Debian's OpenBLAS
(``libopenblas0-pthread``), preloaded with ``LD_PRELOAD``, makes fp32 matmuls 5-20x faster with
identical output (docs/architecture.md). ``impetus serve`` preloads it when it is installed;
this module finds it and reports what the running process actually uses.

A leaf module: standard library only, safe to import anywhere (the CLI imports it before exec).
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

# Debian/Ubuntu multiarch layout of libopenblas0-pthread, e.g.
# /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
OPENBLAS_GLOBS = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/openblas-pthread/libopenblas.so.0",
)

# OpenBLAS's idle worker threads spin 2^N cycles before they sleep (preload_env): N, as its env var takes it.
OPENBLAS_IDLE_SPIN = "16"


def find_system_library(patterns: tuple[str, ...]) -> Path | None:
    """The first file matching one of ``patterns`` (globs, in order), or None (always None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)):
            path = Path(match)
            if path.is_file():
                return path
    return None


def find_openblas() -> Path | None:
    """Path of an installed pthread OpenBLAS shared library, or None (always None off Linux)."""
    return find_system_library(OPENBLAS_GLOBS)


def preload_env(env: dict[str, str]) -> dict[str, str]:
    """Return a copy of ``env`` set up to preload OpenBLAS when available.

    Sets ``IMPETUS_BLAS`` to ``openblas`` (preloaded, or already in ``LD_PRELOAD``) or
    ``reference``. ``IMPETUS_NO_OPENBLAS=1`` turns the preload off.

    With OpenBLAS, ``OPENBLAS_THREAD_TIMEOUT`` defaults to ``OPENBLAS_IDLE_SPIN`` (an operator's own
    value stays): its worker threads spin-wait ~2^28 cycles (~0.1 s) after each call by default, so
    between decode steps one of them held a core the server's HTTP threads needed. 2^16 cycles
    (~25 µs) keeps them awake across a step's back-to-back matmuls. Measured on 2 CPU cores, tiny
    bench model (issue 28 proxy): the server's CPU a token at 16 streams 309 -> 239 µs; raw
    ``batch_generate``-8 of the 8-layer bench model no slower (docs/performance.md).
    """
    env = dict(env)
    preload = env.get("LD_PRELOAD", "")
    if "openblas" in preload:
        env["IMPETUS_BLAS"] = "openblas"
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_IDLE_SPIN)
        return env
    lib = None if env.get("IMPETUS_NO_OPENBLAS", "") not in ("", "0") else find_openblas()
    if lib is None:
        env["IMPETUS_BLAS"] = "reference"
        return env
    env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else str(lib)
    env["IMPETUS_BLAS"] = "openblas"
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_IDLE_SPIN)
    return env


def blas_in_use() -> str:
    """'openblas' when an OpenBLAS library is mapped into this process, else 'reference'.

    On macOS MLX uses Accelerate/Metal: reported as 'accelerate'.
    """
    if sys.platform == "darwin":
        return "accelerate"
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                # A system OpenBLAS (what we preload). Wheels' private copies, such as numpy's
                # libscipy_openblas64_ in site-packages/numpy.libs, use renamed symbols that
                # MLX never calls, so they do not count.
                if "libopenblas" in line and "site-packages" not in line and ".libs/" not in line:
                    return "openblas"
    except OSError:
        return os.environ.get("IMPETUS_BLAS", "reference")
    return "reference"
