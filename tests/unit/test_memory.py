"""The C allocator under MLX (gerdsen_ai_server.runtime.memory): buffers MLX frees go back to the system,
and buffers it allocates again are not faulted in afresh each time.

Each case runs in a fresh interpreter (mallopt is process-wide and one-way; jemalloc is preloaded
through ``allocator_env``, as ``impetus serve`` does). The control cases, glibc's default (keeps
freed memory) and glibc's fixed threshold (faults every new buffer in), show what each setting
is there for, so the cases for the others can fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gerdsen_ai_server.runtime.memory import allocator_env, find_jemalloc, malloc_info, set_mmap_threshold

pytestmark = [pytest.mark.timing, pytest.mark.skipif(malloc_info() is None, reason="needs glibc (mallinfo2, mallopt)")]

# 64 buffers of 4 MiB, most freed, three times over: the shape of a batch's KV and activation buffers.
SCRIPT = """
import sys
import mlx.core as mx
import psutil
from gerdsen_ai_server.runtime.memory import malloc_info, set_mmap_threshold

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
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threshold)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_fixed_threshold_returns_freed_buffers() -> None:
    rss_kept, heap_free = kept_after_free(256 << 10)
    assert rss_kept < 48 << 20, f"RSS still {rss_kept >> 20} MiB above its start after 256 MiB was freed"
    assert heap_free < 48 << 20


def test_glibc_default_keeps_them() -> None:
    rss_kept, heap_free = kept_after_free(0)
    assert rss_kept > 96 << 20, (
        f"glibc's default kept only {rss_kept >> 20} MiB: the control no longer shows the problem"
    )
    assert heap_free > 96 << 20


def test_no_threshold_means_glibc_default() -> None:
    assert set_mmap_threshold(0) is False  # leaves this (pytest) process alone


# The reuse pattern of a decode loop: buffers of 1-1.3 MiB in varying sizes (a batch's logits,
# activations, KV slices), allocated and freed over and over. Minor page faults in the second pass.
REUSE = """
import resource
import sys
import time
import mlx.core as mx
import psutil
from gerdsen_ai_server.runtime.memory import allocator, set_mmap_threshold

set_mmap_threshold(int(sys.argv[1]))
mx.set_cache_limit(0)  # every freed buffer goes back to the C allocator

def churn():
    for i in range(20):
        arrays = [mx.ones((256 + (7 * i + 11 * j) % 64, 1024)) for j in range(16)]
        mx.eval(arrays)
        del arrays

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
process = psutil.Process()
base = process.memory_info().rss
kept = []
for _ in range(3):  # SCRIPT's pattern: 768 MiB allocated, a few buffers live on among the freed
    arrays = [mx.ones((1024, 1024)) for _ in range(64)]
    mx.eval(arrays)
    kept += arrays[7::8]
    del arrays
def rss_kept():
    return process.memory_info().rss - base - sum(a.nbytes for a in kept)
deadline = time.monotonic() + 40  # jemalloc gives the last freed pages back within about 10 s (dirty_decay_ms)
while rss_kept() > 48 << 20 and time.monotonic() < deadline:
    time.sleep(0.5)
print(allocator(), faults, rss_kept())
"""


def reuse(threshold: int, jemalloc: bool) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_CONF", "IMPETUS_MALLOC")}
    env = allocator_env({**env, "IMPETUS_MALLOC": "jemalloc" if jemalloc else "glibc"})
    out = subprocess.run(
        [sys.executable, "-c", REUSE, str(threshold)], capture_output=True, text=True, env=env, timeout=120, check=True
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(find_jemalloc() is None, reason="jemalloc is not installed (make setup installs libjemalloc2)")
def test_jemalloc_reuses_freed_buffers_and_gives_them_back() -> None:
    name, faults, rss_kept = reuse(0, jemalloc=True)
    assert name == "jemalloc"
    # Measured: ~100 faults (glibc with the fixed threshold: ~95,000, the control below).
    assert faults < 10_000, f"{faults} page faults reusing 320 freed buffers"
    assert rss_kept < 48 << 20, f"RSS still {rss_kept >> 20} MiB up 40 s after 672 MiB was freed"


def test_fixed_threshold_faults_every_new_buffer_in() -> None:
    name, faults, _ = reuse(256 << 10, jemalloc=False)
    assert name == "glibc"
    assert faults > 50_000, f"only {faults} page faults: the control no longer shows the cost"
