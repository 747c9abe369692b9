"""Where the engine thread's time goes while 8 streams decode: py-spy samples of the Gunicorn worker,
bucketed by what the engine thread was doing, beside each OS thread's CPU time (``--profile``); and the
worker's CPU by thread group (``thread_cpu``), which the micro-model proxy reports per token (bench/overhead.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import client
from bench.prompts import completion_prompts
from bench.report import say
from tests.support.server import Server


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    from shutil import which

    return which("py-spy")


def run_profile(server: Server, args: argparse.Namespace, expected_wall: float) -> dict[str, Any] | None:
    """py-spy the Gunicorn worker while 8 streams decode (a pass of its own, not measured).

    Two views: py-spy's samples of the engine thread (where its wall time goes), and each OS
    thread's CPU time over the same window (psutil), grouped by py-spy's thread names; threads
    py-spy does not see are native ones (MLX's CPU stream thread, OpenBLAS workers).
    """
    import psutil

    spy = py_spy()
    if spy is None:
        return None
    children = psutil.Process(server.process.pid).children()
    if not children:
        return None
    worker = children[0]
    streams = 8
    prompts = completion_prompts(streams * 4, args.prompt_words, seed=7777)
    out = Path(tempfile.mkdtemp(prefix="bench-prof-")) / "profile.txt"
    say("  profiling the worker (py-spy, 8 streams) ...")
    result: dict[str, Any] = {}

    def load() -> None:
        result["level"] = client.run_level(server.url, server.model, prompts, streams, args.max_tokens)

    def thread_cpu() -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in worker.threads()}

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.0)  # past admission and the first prefill
    # Sample while the pass is surely still decoding: from 1 s in to ~1.5 s before its expected end.
    duration = max(2, min(20, int(expected_wall - 2.5)))
    spy_cmd = [
        spy,
        "record",
        "--pid",
        str(worker.pid),
        "--threads",
        "--idle",
        "--nonblocking",
        "--rate",
        "200",
        "--duration",
        str(duration),
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    cpu0, wall0 = thread_cpu(), time.perf_counter()
    proc = subprocess.run(spy_cmd, capture_output=True, text=True)
    cpu1, wall1 = thread_cpu(), time.perf_counter()
    t.join()
    if proc.returncode != 0 or not out.exists():
        say(f"  py-spy failed: {proc.stderr.strip()[-300:]}")
        return None
    raw = out.read_text()
    summary = summarize_profile(raw)
    names = thread_names(raw)
    groups: dict[str, float] = {}
    for tid, cpu in cpu1.items():
        name = names.get(tid, "")
        group = (
            "engine thread (Python + MLX calls made on it)"
            if name == "impetus-engine"
            else "HTTP request threads (Gunicorn gthread)"
            if name.startswith("ThreadPoolExecutor")
            else f"Python thread {name}"
            if name
            else "native threads (MLX CPU stream, OpenBLAS workers)"
        )
        groups[group] = groups.get(group, 0.0) + (cpu - cpu0.get(tid, 0.0)) / (wall1 - wall0)
    summary["cpu"] = sorted(((g, c) for g, c in groups.items() if c >= 0.005), key=lambda kv: -kv[1])
    summary["tps"] = result["level"].aggregate_tps if "level" in result else float("nan")
    summary["duration"] = duration
    return summary


# The groups a worker's OS threads are charged to (thread_cpu): by py-spy's names of its Python threads.
CPU_GROUPS = ("engine", "http", "native", "other")


def _group(name: str) -> str:
    if name == "impetus-engine":
        return "engine"  # the engine thread: Python, and the MLX calls made on it (graph building, eval)
    if name.startswith("ThreadPoolExecutor"):
        return "http"  # Gunicorn's gthread request threads: the HTTP work, SSE and the hand-off from the engine
    return "other" if name else "native"  # no Python name: MLX's CPU stream, OpenBLAS workers


def thread_cpu(server: Server) -> Any:
    """A reader of the Gunicorn worker's CPU seconds so far by ``CPU_GROUPS`` (psutil, each OS thread),
    or None without py-spy, which names the threads (a 1-second recording). A reading that finds a thread
    the last recording did not see (a request thread Gunicorn's pool added for more streams) records again
    first, so that its CPU counts under its name, not as native."""
    import psutil

    spy = py_spy()
    children = psutil.Process(server.process.pid).children()
    if spy is None or not children:
        return None
    worker = children[0]
    names: dict[int, str] = {}
    seen: set[int] = set()  # the threads a recording saw (native ones have no name)

    def name_threads() -> bool:
        out = Path(tempfile.mkdtemp(prefix="bench-names-")) / "names.txt"
        cmd = [spy, "record", "--pid", str(worker.pid), "--threads", "--idle", "--nonblocking", "--rate", "50"]
        cmd += ["--duration", "1", "--format", "raw", "--output", str(out)]
        alive = {t.id for t in worker.threads()}
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0 or not out.exists():
            return False
        names.update(thread_names(out.read_text()))
        seen.update(alive)
        return True

    if not name_threads():
        return None

    def read() -> dict[str, float]:
        groups = dict.fromkeys(CPU_GROUPS, 0.0)
        try:
            threads = worker.threads()
            if any(t.id not in seen for t in threads) and name_threads():
                threads = worker.threads()
            for t in threads:
                groups[_group(names.get(t.id, ""))] += t.user_time + t.system_time
        except psutil.Error:
            pass
        return groups

    return read


def thread_names(raw: str) -> dict[int, str]:
    """OS thread id -> Python thread name, from py-spy's ``thread (TID): NAME;...`` roots."""
    names = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        head = stack.split(";", 1)[0] if count.isdigit() else ""
        if head.startswith("thread (") and "):" in head:
            tid, _, name = head[len("thread (") :].partition("):")
            if tid.strip().isdigit():
                names[int(tid)] = name.strip()
    return names


def _bucket(frames: list[str]) -> str:
    methods = [f.split(" (")[0].rsplit(".", 1)[-1] for f in frames]
    leaf = frames[-1] if frames else ""  # a sample caught outside any Python frame

    def under(name: str) -> bool:
        return name in methods

    if under("_drain_commands"):
        return "idle: waiting for work (command queue)"
    if under("_admit"):
        return "admission: prompt-cache lookup, BatchGenerator.insert"
    if under("_remember") or under("store"):  # PrefixCache.store (engine/prompt_cache.py)
        return "prompt-cache store of finished sequences (_remember)"
    if under("_emit"):
        return "per-token output: detokenize, stop strings, stream put (_emit)"
    if under("_drop_cancelled") or under("cancel") or under("expire_idle"):  # Backend.cancel
        return "cancellation / keep-alive scans"
    if under("_step") or under("step"):  # Backend.step (engine/backends/mlx.py)
        if any("PromptProcessingBatch" in f for f in frames):
            return "prefill of new prompts (PromptProcessingBatch)"
        if "mlx_lm/models/" in leaf or "nn/layers/" in leaf:
            return "decode: building the model graph in Python (mlx_lm.models)"
        if leaf.startswith("GenerationBatch._step"):
            return "decode: waiting on MLX compute (mx.eval / tolist in GenerationBatch._step)"
        return "decode: sampling and BatchGenerator bookkeeping (Python)"
    return "engine loop, other"


def summarize_profile(raw: str) -> dict[str, Any]:
    """The engine thread's samples of a py-spy raw (collapsed, --threads --idle) profile, bucketed."""
    buckets: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = stack.split(";")
        if not frames[0].endswith("impetus-engine"):
            continue
        count = int(count_text)
        total += count
        bucket = _bucket(frames[1:])
        buckets[bucket] = buckets.get(bucket, 0) + count
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
    return {
        "engine_samples": total,
        "buckets": sorted(buckets.items(), key=lambda kv: -kv[1]),
        "top_leaves": sorted(leaves.items(), key=lambda kv: -kv[1])[:8],
    }
