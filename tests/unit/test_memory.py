"""glibc's mmap threshold (gerdsen_ai_server.memory): buffers MLX frees go back to the system.

Each case runs in a fresh interpreter (mallopt is process-wide and one-way). The control case,
glibc's default, shows the retention the setting exists for, so the first case can fail.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gerdsen_ai_server.memory import malloc_info, set_mmap_threshold

pytestmark = pytest.mark.skipif(malloc_info() is None, reason="needs glibc (mallinfo2, mallopt)")

# 64 buffers of 4 MiB, most freed, three times over: the shape of a batch's KV and activation buffers.
SCRIPT = """
import sys
import mlx.core as mx
import psutil
from gerdsen_ai_server.memory import malloc_info, set_mmap_threshold

threshold = int(sys.argv[1])
assert set_mmap_threshold(threshold) == (threshold > 0)
mx.set_cache_limit(0)  # MLX's own cache out of the way: what stays is the C heap's doing
process = psutil.Process()
base = process.memory_info().rss
kept = []
for _ in range(3):
    arrays = [mx.ones((1024, 1024)) for _ in range(64)]
    mx.eval(arrays)
    kept += arrays[7::8]  # a few live on (as prompt-cache entries do) among the freed
    del arrays
print(process.memory_info().rss - base - sum(a.nbytes for a in kept), malloc_info()["free_bytes"])
"""


def kept_after_free(threshold: int) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threshold)], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_fixed_threshold_returns_freed_buffers() -> None:
    rss_kept, heap_free = kept_after_free(256 << 10)
    assert rss_kept < 48 << 20, f"RSS still {rss_kept >> 20} MiB above its start after 256 MiB was freed"
    assert heap_free < 48 << 20


def test_glibc_default_keeps_them() -> None:
    rss_kept, heap_free = kept_after_free(0)
    assert rss_kept > 96 << 20, f"glibc's default kept only {rss_kept >> 20} MiB: the control no longer shows the problem"
    assert heap_free > 96 << 20


def test_no_threshold_means_glibc_default() -> None:
    assert set_mmap_threshold(0) is False  # leaves this (pytest) process alone
