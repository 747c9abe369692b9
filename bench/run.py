"""Side-by-side benchmark: our server against ``python -m mlx_lm.server`` and raw mlx-lm, one run.

    make bench                              # the full run (~6-10 min on 2 cores); writes docs/performance.md
    impetus bench [options]                 # the same
    python -m bench.run --quick             # ~2-minute smoke run (still writes docs/performance.md unless --no-write)
    python -m bench.run --tiny --out F.md   # seconds: a 2-layer model, for tests

One after the other, on one bench model (``bench/model.py``: random-weight llama, hidden 512,
8 layers, bfloat16 as stored) and one machine:

1. raw in-process mlx-lm (``bench/raw.py``, a subprocess each): one stream (``stream_generate``)
   and ``batch_generate`` on 4/8/16 prompts, in bfloat16 as stored with the wheel's reference
   BLAS, and in float32 with OpenBLAS preloaded (what our server computes in on a Linux CPU);
2. our server: ``impetus serve`` with ``IMPETUS_DEFAULT_MODEL=<bench folder>``, ``IMPETUS_MAX_BATCH=16``
   (``--ours-env`` adds settings), and on Linux again with ``IMPETUS_MALLOC=glibc`` (glibc's malloc
   with the fixed mmap threshold instead of jemalloc: what that allocator costs; ``--skip-malloc-variant``);
3. ``python -m mlx_lm.server --model <bench folder>`` as shipped, again with the same OpenBLAS
   preload (at 8 streams only: bf16 never reaches the BLAS, and it measured as shipped in every run),
   and (engine to engine, same compute) with OpenBLAS on a float32 copy of the model;
4. when ``llama_cpp`` is installed (``--skip-llamacpp`` to leave it out), the same weights as an
   f32 GGUF (``bench/gguf_model.py``): raw in-process llama.cpp, one stream
   (``bench/raw_llamacpp.py``); our server on its llama.cpp backend (``IMPETUS_BACKEND=llamacpp``);
   and llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``) as the peer, with
   the issue 12 targets.

Where MLX computes on a GPU (its CUDA or Metal build), there is no BLAS to choose: the raw reference is
bf16 as stored, the OpenBLAS peers and the malloc variant are left out, the targets add "8 streams
≥ 3x one stream", and the run is written to its own block of docs/performance.md.

The servers are all started, then each concurrency level runs on each server in turn (only one
is driven at a time): on a shared 2-core machine the load from other work drifts by the minute,
and interleaving makes it fall on every server alike (``--sequential``: one server process at a
time). The limits the targets compare with (raw one stream, ``batch_generate`` on 8 prompts, in the
configuration our server computes in) are measured again in every round of the 1- and 8-stream
levels, just before the servers, by one resident raw process (``bench.raw --serve``, idle in
between): each round's ratio compares figures taken seconds apart, not the start and the end of a
run on a machine whose speed drifts by 20 % and more, and the targets take the median of the
rounds' ratios (9 rounds by default: on a 2-core host whose speed moves ±10 % between rounds, a
median of 5 missed the 8-stream target in one run of five whose 25 rounds had a median of 102 %;
resampling those rounds, 9 halve how often that happens, for about a minute more a run).

Every server gets the same streaming client (``bench/client.py``): closed-loop streams at each
concurrency (aggregate output tok/s, p50/p99 time to first token), then a multi-turn chat with
a ~1,000-token history sent cold and again with one more turn (warm: the prompt-prefix cache).
Prints markdown tables and the issue 3 targets, met or not, and writes them with the date,
machine, versions and command to ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import client  # noqa: E402
from bench.model import BENCH, TINY, default_models_dir, default_out, is_built  # noqa: E402
from bench.prompts import chat_history, completion_prompts  # noqa: E402
from gerdsen_ai_server.runtime.blas import find_openblas  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Our server again on glibc's malloc with the fixed mmap threshold (the fallback where jemalloc is not
# installed; memory.py) instead of jemalloc: what that allocator costs, measured in the same run.
MALLOC_VARIANT = ("IMPETUS_MALLOC", "glibc")
GPU_BEGIN, GPU_END = "<!-- bench-gpu:begin -->", "<!-- bench-gpu:end -->"  # a run where MLX computes on a GPU


# ---------------------------------------------------------------- options

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~2-minute smoke run: 1 and 8 streams, 32 tokens")
    p.add_argument("--tiny", action="store_true", help="tests: a 2-layer hidden-64 model, 1 and 2 streams, 8 tokens, "
                   "no mlx_lm.server, no profile, docs untouched unless --out")
    p.add_argument("--streams", help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--batches", help="batch_generate sizes (default 4,8,16)")
    p.add_argument("--max-tokens", type=int, help="output tokens per request (default 64)")
    p.add_argument("--requests-per-stream", type=int, help="requests each stream sends, back to back (default 2)")
    p.add_argument("--min-requests", type=int, help="at least this many requests a level (default 4)")
    p.add_argument("--prompt-words", type=int, default=12, help="words per completion prompt (~2.7 tokens each)")
    p.add_argument("--history-tokens", type=int, help="multi-turn history length (default 1000)")
    p.add_argument("--chat-reps", type=int, help="cold/warm pairs on our server, each on its own history (default 3; "
                   "one for each mlx_lm.server)")
    p.add_argument("--skip-mlx-server", action="store_true", help="do not run python -m mlx_lm.server")
    p.add_argument("--skip-mlx-openblas", action="store_true",
                   help="run mlx_lm.server only as shipped (not again with OpenBLAS, bf16 and fp32)")
    p.add_argument("--skip-raw", action="store_true", help="do not measure raw in-process mlx-lm")
    p.add_argument("--skip-llamacpp", action="store_true",
                   help="no llama.cpp rows (our llama.cpp backend, llama-cpp-python's server, raw llama.cpp)")
    p.add_argument("--raw-repeats", type=int, help="full raw passes (start, end); each figure the best (default 1)")
    p.add_argument("--level-repeats", type=int, help="rounds of the 1- and 8-stream levels on every server and on "
                   "the resident raw process; the targets take the median of the rounds' ratios (default 9)")
    p.add_argument("--sequential", action="store_true",
                   help="start, measure and stop one server at a time (default: all started, levels interleaved, "
                        "so a shared machine's changing load hits every server alike)")
    p.add_argument("--profile", dest="profile", action="store_true", default=None,
                   help="py-spy the engine thread during an extra 8-stream pass (default: on when py-spy is installed)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--ours-env", action="append", default=[], metavar="IMPETUS_X=VALUE",
                   help="a setting for our server (repeatable), e.g. IMPETUS_ADMIT_WINDOW_MS=0 for an A/B run")
    p.add_argument("--skip-malloc-variant", action="store_true",
                   help=f"on Linux, do not run our server a second time with {MALLOC_VARIANT[0]}={MALLOC_VARIANT[1]}")
    p.add_argument("--model-dir", type=Path, help="bench model folder (default build/bench-model[-tiny])")
    p.add_argument("--models-dir", type=Path, help="where the default model is converted (the tokenizer source)")
    p.add_argument("--out", type=Path, help=f"markdown file to write (default {DOC.relative_to(ROOT)})")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    if args.tiny:
        defaults = dict(streams="1,2", batches="2", max_tokens=8, requests_per_stream=1, history_tokens=150,
                        chat_reps=1, raw_repeats=1, min_requests=1)
        args.skip_mlx_server = True
        args.skip_llamacpp = True
        args.skip_malloc_variant = True
        args.profile = False if args.profile is None else args.profile
        if args.out is None:
            args.no_write = True
    elif args.quick:
        defaults = dict(streams="1,8", batches="8", max_tokens=32, requests_per_stream=1, history_tokens=1000,
                        chat_reps=1, raw_repeats=1, min_requests=4)
        args.skip_mlx_openblas = True
        args.profile = False if args.profile is None else args.profile
    else:
        defaults = dict(streams="1,4,8,16", batches="4,8,16", max_tokens=64, requests_per_stream=2,
                        history_tokens=1000, chat_reps=3, raw_repeats=1, min_requests=4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.level_repeats is None:
        args.level_repeats = 1 if args.tiny or args.quick else 9
    args.stream_levels = [int(s) for s in str(args.streams).split(",") if s.strip()]
    args.batch_sizes = [int(s) for s in str(args.batches).split(",") if s.strip()]
    if args.profile is None:
        args.profile = _py_spy() is not None
    return args


def _py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    from shutil import which

    return which("py-spy")


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    """This environment without any BLAS preload (each run sets its own) or server settings."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("IMPETUS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def device_label(gpu: str) -> str:
    return f"GPU ({gpu})" if gpu else "CPU"


def openblas_env(env: dict[str, str]) -> dict[str, str]:
    lib = find_openblas()
    return {**env, "LD_PRELOAD": str(lib)} if lib else dict(env)


def accelerator(env: dict[str, str]) -> str:
    """'' when MLX computes on the CPU here; else the GPU it computes on (MLX's CUDA or Metal build).

    Asked in a subprocess, as the servers and raw runs see it (this process never imports MLX)."""
    code = ("import mlx.core as mx\n"
            "if mx.default_device() == mx.cpu: print('')\n"
            "elif mx.metal.is_available(): print('Metal')\n"
            "else: print('CUDA')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"MLX does not start here:\n{out.stderr[-2000:]}")
    name = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if name == "CUDA":
        from shutil import which

        smi = which("nvidia-smi")
        gpu = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines() if smi else []
        name = f"CUDA, {gpu[0]}" if gpu else "CUDA"
    return name


@dataclass
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_server(name: str, cmd: list[str], env: dict[str, str], port: int, ready_path: str,
                 logs: Path, timeout: float = 300) -> Server:
    log_path = logs / f"{name.replace(' ', '_').replace('/', '_')}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", "", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + ready_path, timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"{name} not ready in {timeout:.0f} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        try:
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- measurements

def raw_cmd(model_dir: Path, dtype: str, args: argparse.Namespace) -> list[str]:
    """``bench.raw`` on the bench model, as a full pass and as the resident process (``--serve``) alike."""
    return [sys.executable, "-m", "bench.raw", "--single-reps", "1" if args.tiny else "3", "--model", str(model_dir),
            "--max-tokens", str(args.max_tokens), "--prompt-words", str(args.prompt_words)] + (
        ["--dtype", dtype] if dtype else [])


def run_raw(label: str, model_dir: Path, env: dict[str, str], dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = raw_cmd(model_dir, dtype, args) + ["--batches", ",".join(map(str, args.batch_sizes))]
    say(f"raw mlx-lm, {label} ...")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bench.raw ({label}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["label"] = label
    say(f"  one stream {result['single']['decode_tps']:.1f} tok/s; "
        + ", ".join(f"batch {b['n']}: {b['e2e_tps']:.1f}" for b in result["batch"]))
    return result


def model_id(server: Server) -> str:
    try:
        data = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
        return str(data[0]["id"])
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return "default_model"


def server_cpu(server: Server) -> float:
    """CPU seconds used so far by the server process and its children (Gunicorn's worker)."""
    import psutil

    try:
        procs = [psutil.Process(server.process.pid)]
        procs += procs[0].children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs)
    except psutil.Error:
        return float("nan")


def warm_up(server: Server, args: argparse.Namespace) -> None:
    """The first requests allocate buffers; not measured."""
    client.run_level(server.url, server.model, completion_prompts(4, args.prompt_words, seed=99), 4, 4)


def measure_level(server: Server, args: argparse.Namespace, streams: int, round_: int = 0) -> client.LevelResult:
    n = max(streams * args.requests_per_stream, args.min_requests)  # one stream: a few requests, not one
    # New prompts each round: a repeated prompt would be answered from the prefix cache.
    prompts = completion_prompts(n, args.prompt_words, seed=1000 + streams + 100 * round_)
    cpu0 = server_cpu(server)
    level = client.run_level(server.url, server.model, prompts, streams, args.max_tokens)
    level.server_cores = (server_cpu(server) - cpu0) / level.wall
    say(f"  {server.name}, {streams:>2} streams: {level.aggregate_tps:6.1f} tok/s, TTFT p50 "
        f"{level.ttft(0.5) * 1000:6.0f} ms p99 {level.ttft(0.99) * 1000:6.0f} ms ({len(level.ok)}/{n} ok, "
        f"{level.tokens} tokens, {level.wall:.1f} s, load {os.getloadavg()[0]:.1f})"
        f"{'  errors: ' + '; '.join(level.errors[:3]) if level.errors else ''}")
    return level


PAIRED = {1: {"op": "single"}, 8: {"op": "batch", "n": 8}}  # the levels the targets compare with a raw limit
# On a CPU the bf16 peers are 4-5x slower than ours, half a minute and more a level: they run each level once
# (the repeated rounds are for the close ratios, ours against the raw limits and the fp32 peer), and
# mlx_lm.server with OpenBLAS on the bf16 checkpoint only the 8-stream level the targets use.
SLOW_PEERS: dict[str, tuple[int, ...] | None] = {"mlx": None, "mlx+openblas": (8,)}
# Our server on glibc's malloc (the allocator comparison, for information) runs each level once too.
ONCE_A_LEVEL = {"ours malloc"}


def measured(args: argparse.Namespace, key: str, streams: int, round_: int) -> bool:
    """Whether server ``key`` runs this level in this round (see SLOW_PEERS, ONCE_A_LEVEL)."""
    if key in ONCE_A_LEVEL:
        return round_ == 0
    if args.gpu or key not in SLOW_PEERS:
        return True
    levels = SLOW_PEERS[key]
    return round_ == 0 and (levels is None or streams in levels)


def level_rounds(args: argparse.Namespace, streams: int) -> int:
    """Rounds of a level on every server: the 1- and 8-stream levels, compared with raw limits measured in
    the same rounds, run ``--level-repeats`` times (the targets take the median of the rounds' ratios)."""
    return args.level_repeats if streams in PAIRED else 1


class RawWorker:
    """``bench.raw --serve``: the reference configuration loaded once, measuring a limit when asked (idle
    in between), so that the limits are taken in the same rounds as the servers' levels."""

    def __init__(self, label: str, model_dir: Path, env: dict[str, str], dtype: str, args: argparse.Namespace,
                 logs: Path) -> None:
        self.label, self.log_path = label, logs / "raw-worker.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(raw_cmd(model_dir, dtype, args) + ["--serve"], cwd=ROOT, env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self._answer()  # {"ready": ...} once the model is loaded and warm
        self.rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in PAIRED}

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.raw --serve ({self.label}) exited:\n{self.log_path.read_text()[-3000:]}")
        return dict(json.loads(line))

    def measure(self, streams: int, round_: int) -> None:
        assert self.process.stdin is not None
        request = {**PAIRED[streams], "seed": 1000 + streams + 100 * round_}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        out = self._answer()
        self.rounds[streams].append(out)
        figure = out["decode_tps"] if streams == 1 else out["e2e_tps"]
        say(f"  raw {self.label}, {'one stream' if streams == 1 else 'batch_generate 8'}: {figure:6.1f} tok/s "
            f"(load {os.getloadavg()[0]:.1f})")

    def best(self) -> dict[str, Any]:
        """The best round of each limit: ``single`` by decode rate, ``batch8`` by tokens over wall time."""
        out: dict[str, Any] = {}
        if self.rounds[1]:
            out["single"] = max(self.rounds[1], key=lambda r: r["decode_tps"])
        if self.rounds[8]:
            out["batch8"] = max(self.rounds[8], key=lambda r: r["e2e_tps"])
        return out

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def faster(a: client.LevelResult | None, b: client.LevelResult) -> client.LevelResult:
    """The round with the higher aggregate tok/s, whole (its TTFTs come from the same round)."""
    return b if a is None or b.aggregate_tps > a.aggregate_tps else a


def history_turns(target_tokens: int, tokenizer_json: Path) -> int:
    """Turns of ``chat_history`` whose text comes closest to ``target_tokens`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def count(turns: int) -> int:
        return sum(len(tok.encode(m["content"]).ids) + 5 for m in chat_history(turns, 0))

    turns = 1
    while count(turns + 1) <= target_tokens:
        turns += 1
    return turns


def cache_hits(server: Server) -> int | None:
    """Our server's prompt-prefix cache hits so far (/metrics); None for a server without them."""
    try:
        text = requests.get(server.url + "/metrics", timeout=10).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith("impetus_prompt_cache_hits") and not line.startswith("#"):
            try:
                return int(float(line.split()[-1]))
            except ValueError:
                return None
    return None


def measure_chat(server: Server, args: argparse.Namespace, reps: int) -> dict[str, Any]:
    pairs = []
    hits0 = cache_hits(server)
    for rep in range(reps):
        history = chat_history(args.turns, nonce=hash((server.name, rep)) % 10**6)
        cold = client.chat(server.url, server.model, history, max_tokens=16)
        if not cold.ok:
            say(f"  chat cold failed: {cold.error}")
            continue
        more = history + [{"role": "assistant", "content": cold.text},
                          {"role": "user", "content": "Thank you. One more question: why?"}]
        warm = client.chat(server.url, server.model, more, max_tokens=16)
        if not warm.ok:
            say(f"  chat warm failed: {warm.error}")
            continue
        pairs.append((cold, warm))
    if not pairs:
        return {}
    cold_ttft = statistics.median(c.ttft for c, _ in pairs)
    warm_ttft = statistics.median(w.ttft for _, w in pairs)
    result = {"history_tokens": pairs[0][0].prompt_tokens, "warm_prompt_tokens": pairs[0][1].prompt_tokens,
              "cold": cold_ttft, "warm": warm_ttft, "reps": len(pairs), "hits": None}
    hits1 = cache_hits(server)
    if hits0 is not None and hits1 is not None:
        result["hits"] = hits1 - hits0
    say(f"  chat, {result['history_tokens']}-token history: cold TTFT {cold_ttft * 1000:.0f} ms, "
        f"warm {warm_ttft * 1000:.0f} ms ({cold_ttft / warm_ttft:.1f}x)")
    return result


# ---------------------------------------------------------------- profile

def run_profile(server: Server, args: argparse.Namespace, expected_wall: float) -> dict[str, Any] | None:
    """py-spy the Gunicorn worker while 8 streams decode (a pass of its own, not measured).

    Two views: py-spy's samples of the engine thread (where its wall time goes), and each OS
    thread's CPU time over the same window (psutil), grouped by py-spy's thread names; threads
    py-spy does not see are native ones (MLX's CPU stream thread, OpenBLAS workers).
    """
    import psutil

    spy = _py_spy()
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
    spy_cmd = [spy, "record", "--pid", str(worker.pid), "--threads", "--idle", "--nonblocking", "--rate", "200",
               "--duration", str(duration), "--format", "raw", "--output", str(out)]
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
        group = ("engine thread (Python + MLX calls made on it)" if name == "impetus-engine"
                 else "HTTP request threads (Gunicorn gthread)" if name.startswith("ThreadPoolExecutor")
                 else f"Python thread {name}" if name
                 else "native threads (MLX CPU stream, OpenBLAS workers)")
        groups[group] = groups.get(group, 0.0) + (cpu - cpu0.get(tid, 0.0)) / (wall1 - wall0)
    summary["cpu"] = sorted(((g, c) for g, c in groups.items() if c >= 0.005), key=lambda kv: -kv[1])
    summary["tps"] = result["level"].aggregate_tps if "level" in result else float("nan")
    summary["duration"] = duration
    return summary


def thread_names(raw: str) -> dict[int, str]:
    """OS thread id -> Python thread name, from py-spy's ``thread (TID): NAME;...`` roots."""
    names = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        head = stack.split(";", 1)[0] if count.isdigit() else ""
        if head.startswith("thread (") and "):" in head:
            tid, _, name = head[len("thread ("):].partition("):")
            if tid.strip().isdigit():
                names[int(tid)] = name.strip()
    return names


_WAITS = ("Condition.wait", "Event.wait", "Queue.get", "select (", ".select (", "sleep (", "Server.sleep", "accept (")


def _bucket(frames: list[str]) -> str:
    methods = [f.split(" (")[0].rsplit(".", 1)[-1] for f in frames]
    leaf = frames[-1] if frames else ""  # a sample caught outside any Python frame

    def under(name: str) -> bool:
        return name in methods

    if under("_drain_commands"):
        return "idle: waiting for work (command queue)"
    if under("_admit"):
        return "admission: prompt-cache lookup, BatchGenerator.insert"
    if under("_remember"):
        return "prompt-cache store of finished sequences (_remember)"
    if under("_emit"):
        return "per-token output: detokenize, stop strings, stream put (_emit)"
    if under("_drop_cancelled") or under("expire_idle"):
        return "cancellation / keep-alive scans"
    if under("_step"):
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
    return {"engine_samples": total, "buckets": sorted(buckets.items(), key=lambda kv: -kv[1]),
            "top_leaves": sorted(leaves.items(), key=lambda kv: -kv[1])[:8]}


# ---------------------------------------------------------------- report

def say(text: str) -> None:
    print(text, flush=True)


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:.0f}"


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"platform": platform.platform(), "cpu": cpu, "cores": str(os.cpu_count()),
            "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "python": platform.python_version()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("impetus", "mlx", "mlx-lm", "gunicorn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def level_of(levels: list[client.LevelResult], streams: int) -> client.LevelResult | None:
    return next((lv for lv in levels if lv.streams == streams), None)


def ratio_row(name: str, value: float, target: str, met: bool | None) -> str:
    verdict = "n/a" if met is None else ("**met**" if met else "not met")
    return f"| {name} | {value} | {target} | {verdict} |"


def paired_ratios(pair: dict[str, Any], ours: dict[str, Any]) -> dict[int, list[float]]:
    """Round by round, our figure over the raw limit measured just before it (one stream: decode rates;
    8 streams: aggregate over ``batch_generate``-8), for the levels measured in the same rounds."""
    out: dict[int, list[float]] = {}
    for n, (limit, value) in {1: ("decode_tps", "stream_decode_tps"), 8: ("e2e_tps", "aggregate_tps")}.items():
        pairs = zip((pair.get("rounds") or {}).get(n, []), (ours.get("rounds") or {}).get(n, []), strict=False)
        ratios = [getattr(level, value) / lim[limit] for lim, level in pairs]
        if ratios:
            out[n] = ratios
    return out


def limit_rows(what: str, where: str, ratios: list[float] | None, best_text: str, best: float) -> list[str]:
    """A target against a raw limit. Measured in the same rounds, the verdict is the median of the rounds'
    ratios (each pair taken seconds apart, so the machine's drift over the run cancels) and each side's best
    round is shown for information; otherwise the best figures decide."""
    if not ratios:
        return [ratio_row(f"{what} ({where})", best_text, "≥ 95 %", best >= 0.95)]
    median = statistics.median(ratios)
    listed = ", ".join(f"{r:.0%}" for r in ratios)
    which = f"median of the {len(ratios)} rounds' ratios" if len(ratios) > 1 else "the one round's ratio"
    return [ratio_row(f"{what} ({where}): {which}", f"{listed} → {median:.0%}",
                      "≥ 95 %", median >= 0.95),
            ratio_row(f"{what}: each side's best round", best_text, "(for information)", None)]


def targets(raw: dict[str, dict[str, Any]], servers: dict[str, dict[str, Any]], ours_info: dict[str, Any],
            gpu: str = "") -> list[str]:
    """The issue 3 targets, from this run's figures (``gpu``: the GPU MLX computed on, '' for the CPU)."""
    rows = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    ours = servers.get("ours")
    if ours is None:
        return rows
    lv = ours["levels"]
    # The raw run that computes as our server does (fp32 + OpenBLAS on a Linux CPU).
    ref_key = "fp32" if ours_info.get("compute_dtype") == "float32" and "fp32" in raw else "bf16"
    ref = raw.get(ref_key) or {}
    # The limits measured in the same rounds as the servers (RawWorker), else those of the raw pass(es).
    pair = ref.get("paired") or {}
    single = pair.get("single") or ref.get("single")
    ceiling = pair.get("batch8") or next((b for b in ref.get("batch", []) if b["n"] == 8), None)
    where = f"{ref.get('label')}, same rounds" if pair else ref.get("label")
    one, eight = level_of(lv, 1), level_of(lv, 8)
    same_rounds = paired_ratios(pair, ours)
    if single and one:
        best = one.stream_decode_tps / single["decode_tps"]
        rows += limit_rows("one stream: ours / raw in-process decode", where, same_rounds.get(1),
                           f"{fmt(one.stream_decode_tps)} / {fmt(single['decode_tps'])} = {best:.0%}", best)
        r2 = one.aggregate_tps / single["e2e_tps"]
        rows.append(ratio_row("one stream, end to end (TTFT included): ours / raw",
                              f"{fmt(one.aggregate_tps)} / {fmt(single['e2e_tps'])} = {r2:.0%}",
                              "(for information)", None))
    if eight and ceiling:
        best = eight.aggregate_tps / ceiling["e2e_tps"]
        rows += limit_rows("8 streams: ours / batch_generate-8 ceiling", f"{where}, prefill included",
                           same_rounds.get(8), f"{fmt(eight.aggregate_tps)} / {fmt(ceiling['e2e_tps'])} = {best:.0%}",
                           best)
        r3 = eight.aggregate_tps / ceiling["decode_tps"]
        rows.append(ratio_row("8 streams: ours / batch_generate-8 decode-only rate",
                              f"{fmt(eight.aggregate_tps)} / {fmt(ceiling['decode_tps'])} = {r3:.0%}",
                              "(for information)", None))
    variant = servers.get("ours malloc")
    v8 = level_of(variant["levels"], 8) if variant else None
    if v8 and ceiling:
        r = v8.aggregate_tps / ceiling["e2e_tps"]
        rows.append(ratio_row(f"8 streams: {variant['label']} / batch_generate-8 ceiling (same run)",
                              f"{fmt(v8.aggregate_tps)} / {fmt(ceiling['e2e_tps'])} = {r:.0%}", "(for information)",
                              None))
    for key, label in (("mlx", "mlx_lm.server as shipped"), ("mlx+openblas", "mlx_lm.server + OpenBLAS"),
                       ("mlx+openblas fp32", "mlx_lm.server + OpenBLAS, fp32 copy")):
        other = servers.get(key)
        o8 = level_of(other["levels"], 8) if other else None
        if not (eight and o8):
            continue
        r = eight.aggregate_tps / o8.aggregate_tps
        rows.append(ratio_row(f"8 streams: ours / {label}, aggregate tok/s",
                              f"{fmt(eight.aggregate_tps)} / {fmt(o8.aggregate_tps)} = {r:.2f}x", "≥ 1x", r >= 1))
        p50 = eight.ttft(0.5) / o8.ttft(0.5)
        rows.append(ratio_row(f"8 streams: p50 TTFT ours / {label}",
                              f"{ms(eight.ttft(0.5))} / {ms(o8.ttft(0.5))} ms = {p50:.2f}x", "≤ 0.7x", p50 <= 0.7))
        p99 = eight.ttft(0.99) / o8.ttft(0.99)
        rows.append(ratio_row(f"8 streams: p99 TTFT ours / {label}",
                              f"{ms(eight.ttft(0.99))} / {ms(o8.ttft(0.99))} ms = {p99:.2f}x", "≤ 1x", p99 <= 1))
        if key == "mlx" and sys.platform.startswith("linux") and not gpu:
            rows.append(ratio_row("Linux: 8 streams ours / mlx_lm.server as shipped (same bf16 checkpoint)",
                                  f"{r:.2f}x", "≥ 4x", r >= 4))
    if gpu and one and eight:
        r = eight.aggregate_tps / one.aggregate_tps
        rows.append(ratio_row(f"GPU ({gpu}): 8 streams / one stream, our aggregate tok/s",
                              f"{fmt(eight.aggregate_tps)} / {fmt(one.aggregate_tps)} = {r:.2f}x", "≥ 3x", r >= 3))
    chat = ours.get("chat") or {}
    if chat:
        r = chat["cold"] / chat["warm"]
        rows.append(ratio_row(f"multi-turn ({chat['history_tokens']}-token history): cold / warm TTFT",
                              f"{ms(chat['cold'])} / {ms(chat['warm'])} ms = {r:.1f}x", "≥ 5x", r >= 5))
    return rows


def run_raw_llamacpp(gguf: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.raw_llamacpp", "--model", str(gguf), "--max-tokens", str(args.max_tokens),
           "--prompt-words", str(args.prompt_words), "--single-reps", "3"]
    say("raw llama.cpp (llama-cpp-python, in process), one stream ...")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench.raw_llamacpp failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    say(f"  one stream {result['single']['decode_tps']:.1f} tok/s")
    return dict(result)


def gguf_file(model_dir: Path, env: dict[str, str]) -> Path:
    code = ("import sys; from pathlib import Path; from bench.gguf_model import write_gguf; "
            "print(write_gguf(Path(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def llamacpp_targets(raw_llama: dict[str, Any], servers: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    ours = servers["ours llama.cpp"]["levels"]
    one, eight = level_of(ours, 1), level_of(ours, 8)
    if one and raw_llama.get("single"):
        ref = raw_llama["single"]["decode_tps"]
        r = one.stream_decode_tps / ref
        rows.append(ratio_row("one stream: ours (llama.cpp) / raw in-process llama.cpp decode",
                              f"{fmt(one.stream_decode_tps)} / {fmt(ref)} = {r:.0%}", "≥ 95 %", r >= 0.95))
    if one and eight:
        r = eight.aggregate_tps / one.aggregate_tps
        rows.append(ratio_row("8 streams / 1 stream, aggregate tok/s (ours, llama.cpp)",
                              f"{fmt(eight.aggregate_tps)} / {fmt(one.aggregate_tps)} = {r:.2f}x", "≥ 2x", r >= 2))
    peer = servers.get("llama-cpp-python server")
    for lv in ours if peer else []:
        other = level_of(peer["levels"], lv.streams)
        if other and other.aggregate_tps > 0:
            r = lv.aggregate_tps / other.aggregate_tps
            rows.append(ratio_row(f"{lv.streams} stream(s): ours (llama.cpp) / llama-cpp-python server",
                                  f"{fmt(lv.aggregate_tps)} / {fmt(other.aggregate_tps)} = {r:.2f}x", "≥ 1x", r >= 1))
    mlx_ours = servers.get("ours")
    if mlx_ours and eight and (m8 := level_of(mlx_ours["levels"], 8)):
        rows.append(ratio_row("8 streams: ours on llama.cpp / ours on MLX (same weights)",
                              f"{fmt(eight.aggregate_tps)} / {fmt(m8.aggregate_tps)} = "
                              f"{eight.aggregate_tps / m8.aggregate_tps:.2f}x", "(for information)", None))
    return rows


def report(args: argparse.Namespace, command: str, started: str, loads: list[tuple[str, tuple[float, ...]]],
           raw: dict[str, dict[str, Any]], servers: dict[str, dict[str, Any]], ours_info: dict[str, Any],
           elapsed: float, model_desc: str, raw_llama: dict[str, Any] | None = None,
           steal: float | None = None) -> str:
    m, v = machine(), versions()
    lines = [
        f"Run {started} on {m['platform']}, {m['cpu']}, {m['cores']} cores, {m['memory']}; Python {m['python']}, "
        f"impetus {v['impetus']}, mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, gunicorn {v['gunicorn']}. "
        f"OpenBLAS: {find_openblas() or 'not installed'}. MLX computes on: "
        f"{device_label(args.gpu)}.",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min). Model: {model_desc}. {args.max_tokens} output tokens a "
        f"request, greedy; completion prompts of ~{args.prompt_words} words; each stream sends "
        f"{args.requests_per_stream} request(s) back to back. Our server: compute dtype "
        f"{ours_info.get('compute_dtype', '?')}, BLAS {ours_info.get('blas', '?')}, C allocator "
        f"{ours_info.get('allocator', '?')}, IMPETUS_MAX_BATCH=16. "
        + ("Servers: started, measured and stopped one at a time." if args.sequential else
           "Servers: all started first; then each concurrency level ran on each server in turn, one server "
           "driven at a time, so the shared machine's changing load falls on all alike."),
        "",
        "Load average (1/5/15 min) during the run: " + "; ".join(
            f"{what} {a:.2f}/{b:.2f}/{c:.2f}" for what, (a, b, c) in loads) + "."
        + ("" if steal is None else f" CPU time the hypervisor gave to other machines (steal, /proc/stat) during "
           f"the run: {steal:.1%} of this machine's."),
        "",
    ]
    if raw:
        sizes = args.batch_sizes
        lines += ["### Raw in-process mlx-lm (the limits)", "",
                  "| configuration | one stream decode tok/s (median) | one stream end to end | "
                  "one stream via batch_generate | "
                  + " | ".join(f"batch_generate {n}: tok/s (decode only)" for n in sizes) + " |",
                  "|---|---|---|---|" + "---|" * len(sizes)]
        for r in raw.values():
            cells = []
            for n in sizes:
                b = next((x for x in r["batch"] if x["n"] == n), None)
                cells.append(f"{fmt(b['e2e_tps'])} ({fmt(b['decode_tps'])})" if b else "n/a")
            sb = r.get("single_batchgen") or {}
            lines.append(f"| {r['label']} | {fmt(r['single']['decode_tps'])} | {fmt(r['single']['e2e_tps'])} | "
                         f"{fmt(sb.get('decode_tps', float('nan')))} | " + " | ".join(cells) + " |")
        lines += ["", "One stream: `stream_generate`'s decode rate (prompt excluded), its tokens over wall time, and "
                  "the decode rate of the same prompt alone through `batch_generate` (BatchGenerator, which both "
                  "servers use). batch_generate N: all output tokens over the call's wall time (prefill included, "
                  "like a server's aggregate); in brackets mlx-lm's own decode-only rate. "
                  + (f"fp32 figures are the best of {args.raw_repeats} passes (start and end of the run)."
                     if args.raw_repeats > 1 else "One pass, at the start of the run."), ""]
    lines += ["### Servers, same streaming client", "",
              "| server | streams | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | per-stream decode tok/s | ok | "
              "server CPU cores | client CPU cores |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in servers.values():
        for lv in s["levels"]:
            lines.append(f"| {s['label']} | {lv.streams} | {fmt(lv.aggregate_tps)} | {ms(lv.ttft(0.5))} | "
                         f"{ms(lv.ttft(0.99))} | {fmt(lv.stream_decode_tps)} | {len(lv.ok)}/{len(lv.results)} | "
                         f"{fmt(lv.server_cores, 2)} | {fmt(lv.client_cores, 2)} |")
    lines += ["", "Aggregate: all output tokens over the level's wall time. Per-stream decode: the median stream's "
              "tokens after the first over its time after the first. CPU cores: CPU seconds over the level's wall "
              "time, of the server's processes and of this benchmark client (which shares the machine)."
              + (f" The 1- and 8-stream levels ran {args.level_repeats} rounds (each on every server in turn, new "
                 "prompts each round); each server's faster round is shown."
                 if args.level_repeats > 1 else "")
              + (" mlx_lm.server on the bf16 checkpoint (4-5x slower here, half a minute and more a level) ran each "
                 "level once, and with OpenBLAS (which bf16 never reaches) only at 8 streams."
                 if not args.gpu and any(k in servers for k in SLOW_PEERS) else "")
              + (" Our server on glibc's malloc (for information) ran each level once."
                 if args.level_repeats > 1 and any(k in servers for k in ONCE_A_LEVEL) else ""), ""]
    lines += paired_table(raw, servers)
    chats = [(s["label"], s["chat"]) for s in servers.values() if s.get("chat")]
    if chats:
        lines += ["### Multi-turn chat: cold vs warm time to first token", "",
                  "| server | prompt tokens cold → warm | cold TTFT ms | warm TTFT ms (history + 1 turn) | "
                  "cold / warm | prefix-cache hits |",
                  "|---|---|---|---|---|---|"]
        for label, c in chats:
            hits = "n/a" if c.get("hits") is None else f"{c['hits']} of {2 * c['reps']} requests"
            lines.append(f"| {label} | {c['history_tokens']} → {c['warm_prompt_tokens']} | {ms(c['cold'])} | "
                         f"{ms(c['warm'])} | {c['cold'] / c['warm']:.1f}x | {hits} |")
        lines += ["", f"Median of {chats[0][1]['reps']} pair(s) for ours (one for each mlx_lm.server), each on its "
                  "own history; 16 output tokens.", ""]
    lines += ["### Targets (issue 3)", "", *targets(raw, servers, ours_info, args.gpu), ""]
    if "ours llama.cpp" in servers:
        lines += ["### Targets (issue 12: the llama.cpp backend, same weights as an f32 GGUF)", "",
                  *llamacpp_targets(raw_llama or {}, servers), ""]
    prof = (servers.get("ours") or {}).get("profile")
    if prof:
        total = max(1, prof["engine_samples"])
        lines += ["### Where the time goes while 8 streams decode (py-spy + per-thread CPU)", "",
                  f"A separate 8-stream pass ({fmt(prof['tps'])} tok/s while profiled), {prof['duration']} s window. "
                  "CPU cores used by the worker's threads (psutil, by py-spy's thread names):", "",
                  "| threads | CPU cores |", "|---|---|"]
        lines += [f"| {g} | {c:.2f} |" for g, c in prof["cpu"]]
        lines += ["", f"The engine thread's wall time ({prof['engine_samples']} py-spy samples at 200 Hz, idle "
                  "included):", "", "| engine thread | share |", "|---|---|"]
        lines += [f"| {name} | {n / total:.1%} |" for name, n in prof["buckets"]]
        lines += ["", "| top leaf frames of the engine thread | share |", "|---|---|"]
        lines += [f"| `{frame}` | {n / total:.1%} |" for frame, n in prof["top_leaves"]]
        lines.append("")
    return "\n".join(lines)


def paired_table(raw: dict[str, dict[str, Any]], servers: dict[str, dict[str, Any]]) -> list[str]:
    """Round by round, the raw limit (measured just before the servers) and our server's figure."""
    pair = next((r["paired"] for r in raw.values() if r.get("paired")), None)
    ours = servers.get("ours")
    if not pair or not ours:
        return []
    rows = ["### The limits, round by round", "",
            "| level | round | raw limit tok/s | ours tok/s | ours / raw |", "|---|---|---|---|---|"]
    for n, what in ((1, "one stream: decode rate"), (8, "8 streams: batch_generate-8 vs aggregate")):
        for i, (lim, level) in enumerate(zip(pair["rounds"].get(n, []), ours["rounds"].get(n, []), strict=False)):
            limit = lim["decode_tps"] if n == 1 else lim["e2e_tps"]
            value = level.stream_decode_tps if n == 1 else level.aggregate_tps
            rows.append(f"| {what} | {i + 1} | {fmt(limit)} | {fmt(value)} | {value / limit:.0%} |")
    return rows + ["", "The raw limits come from one resident in-process mlx-lm (`bench.raw --serve`, the "
                   "configuration our server computes in), measured just before the servers in each round of "
                   "the level. The targets take the median of the rounds' ratios: each pair is measured seconds "
                   "apart, so the machine's drift over the run (10-20 % here) cancels; each side's best round is "
                   "shown there for information.", ""]


def write_doc(path: Path, body: str, gpu: str = "") -> None:
    """Rewrite the run's block in ``path``: the CPU run's block, or (``gpu``) the GPU run's, each its own markers."""
    begin, end = (GPU_BEGIN, GPU_END) if gpu else (BEGIN, END)
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(head + block + tail)
        return
    if text:  # a file without this block: add it as a section of its own
        title = "## Latest GPU run" if gpu else "## Latest run"
        path.write_text(text.rstrip("\n") + f"\n\n{title}\n\n{block}\n")
        return
    intro = (
        "# Performance\n\n"
        "Figures from `make bench` (`python -m bench.run`, also `impetus bench`): our server, "
        "`python -m mlx_lm.server` and raw in-process mlx-lm on one random-weight bench model "
        "(`bench/model.py`), in one run on one machine (one server driven at a time, the concurrency levels "
        "interleaved across servers), all driven by one streaming client (`bench/client.py`). The section between the markers is rewritten by each run; absolute "
        "numbers depend on the machine and its load, ratios from one run hold better.\n\n"
        + ("## Latest GPU run\n\n" if gpu else "## Latest run\n\n")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(intro + block + "\n")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = os.environ.get("IMPETUS_BENCH_COMMAND", command.strip())
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    loads = [("start", os.getloadavg())]
    steal0 = cpu_times()
    spec = TINY if args.tiny else BENCH
    model_dir = (args.model_dir or default_out(spec)).resolve()
    models_dir = args.models_dir or default_models_dir()
    env = base_env()

    if not is_built(model_dir, spec):
        say(f"building the bench model into {model_dir} ...")
        cmd = [sys.executable, "-m", "bench.model", "--out", str(model_dir), "--models-dir", str(models_dir)]
        subprocess.run(cmd + (["--tiny"] if args.tiny else []), cwd=ROOT, env=env, check=True)
    config = json.loads((model_dir / "config.json").read_text())
    model_desc = (f"random llama, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
                  f"{config['num_attention_heads']} heads, intermediate {config['intermediate_size']}, "
                  f"vocab {config['vocab_size']}, stored in {config.get('torch_dtype', '?')} (`{model_dir.name}`)")
    args.turns = history_turns(args.history_tokens, model_dir / "tokenizer.json")
    logs = Path(tempfile.mkdtemp(prefix="impetus-bench-"))
    say(f"bench: {model_desc}; logs in {logs}")

    raw: dict[str, dict[str, Any]] = {}
    raw_llama: dict[str, Any] = {}
    args.gpu = accelerator(env)
    say(f"MLX computes on: {device_label(args.gpu)}")
    if not args.skip_raw and args.gpu:  # the GPU computes as stored: one reference, no BLAS to choose
        raw["bf16"] = run_raw(f"bf16 as stored, GPU ({args.gpu})", model_dir, env, "", args)
    elif not args.skip_raw:
        raw["bf16"] = run_raw("bf16 as stored, reference BLAS", model_dir, env, "", args)
        has_blas = find_openblas() is not None
        raw["fp32"] = run_raw("fp32, OpenBLAS" if has_blas else "fp32, reference BLAS (no OpenBLAS)",
                              model_dir, openblas_env(env), "float32", args)
    gguf: Path | None = None
    if not args.skip_llamacpp and importlib.util.find_spec("llama_cpp") is not None:
        gguf = gguf_file(model_dir, env)
        if not args.skip_raw:
            raw_llama.update(run_raw_llamacpp(gguf, env, args))
    loads.append(("after raw", os.getloadavg()))

    servers: dict[str, dict[str, Any]] = {}
    ours_info: dict[str, Any] = {}
    runs: list[tuple[str, str, Any]] = [("ours", "ours (impetus serve)", {})]
    if not args.skip_malloc_variant and sys.platform.startswith("linux") and not args.gpu:
        runs.append(("ours malloc", f"ours, {MALLOC_VARIANT[0]}={MALLOC_VARIANT[1]}", dict([MALLOC_VARIANT])))
    if not args.skip_mlx_server:
        runs.append(("mlx", "mlx_lm.server as shipped", (env, model_dir)))
        if not args.skip_mlx_openblas and not args.gpu and find_openblas() is not None:
            runs.append(("mlx+openblas", "mlx_lm.server + OpenBLAS (bf16)", (openblas_env(env), model_dir)))
            runs.append(("mlx+openblas fp32", "mlx_lm.server + OpenBLAS, fp32 copy", (openblas_env(env), None)))
    if gguf is not None:
        runs.append(("ours llama.cpp", "ours, llama.cpp backend (f32 GGUF)", gguf))
        if importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec("uvicorn"):
            runs.append(("llama-cpp-python server", "llama-cpp-python server (f32 GGUF)", gguf))
        else:
            say("llama-cpp-python[server] is not installed: no row for its server")

    def launch(key: str, label: str, spec_env: Any) -> Server:
        port = free_port()
        if key in ("ours", "ours malloc"):
            server_env = {**env, "IMPETUS_HOST": "127.0.0.1", "IMPETUS_PORT": str(port),
                          "IMPETUS_DEFAULT_MODEL": str(model_dir), "IMPETUS_MODELS_DIR": str(models_dir),
                          "IMPETUS_MAX_BATCH": "16", "IMPETUS_LOG_LEVEL": "warning",
                          **dict(kv.split("=", 1) for kv in args.ours_env), **spec_env}
            cmd = [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"]
            ready = "/health/ready"
        elif key == "ours llama.cpp":
            server_env = {**env, "IMPETUS_HOST": "127.0.0.1", "IMPETUS_PORT": str(port),
                          "IMPETUS_DEFAULT_MODEL": str(spec_env), "IMPETUS_MODELS_DIR": str(models_dir),
                          "IMPETUS_BACKEND": "llamacpp", "IMPETUS_MAX_BATCH": "16", "IMPETUS_LOG_LEVEL": "warning"}
            cmd = [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"]
            ready = "/health/ready"
        elif key == "llama-cpp-python server":
            server_env = dict(env)
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(spec_env), "--port", str(port),
                   "--host", "127.0.0.1", "--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 1),
                   "--n_threads_batch", str(os.cpu_count() or 1), "--verbose", "false",
                   # by default a new request interrupts the one running: queue them instead
                   "--interrupt_requests", "false"]
            ready = "/v1/models"
        else:
            server_env, folder = spec_env
            if folder is None:
                folder = fp32_folder(model_dir, env)
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)]
            ready = "/health"
        say(f"{label}: starting on port {port} ...")
        server = start_server(label, cmd, server_env, port, ready, logs)
        server.model = model_id(server) if key in ("ours", "ours malloc", "ours llama.cpp", "llama-cpp-python server") \
            else "default_model"
        if key == "ours":
            ours_info.update(requests.get(server.url + "/health", timeout=10).json())
            say(f"  compute dtype {ours_info.get('compute_dtype')}, BLAS {ours_info.get('blas')}, "
                f"allocator {ours_info.get('allocator')}")
        warm_up(server, args)
        return server

    def finish(key: str, server: Server) -> None:
        # mlx_lm.server's cold bf16 prefill of ~1,000 tokens takes ~20 s here: one pair for the peers.
        servers[key]["chat"] = measure_chat(server, args, args.chat_reps if key in ("ours", "ours llama.cpp") else 1)
        if key == "ours" and args.profile:
            # The profile pass sends 4 requests a stream: twice the 8-stream level's (or guess).
            eight = level_of(servers[key]["levels"], 8)
            expected = eight.wall * 32 / max(1, len(eight.results)) if eight else args.max_tokens / 4
            servers[key]["profile"] = run_profile(server, args, expected)
        else:
            servers[key]["profile"] = None

    worker: RawWorker | None = None
    ref = "bf16" if args.gpu else "fp32"  # the reference our server's targets use: fp32 + OpenBLAS on a CPU
    if not args.skip_raw:
        worker = RawWorker(raw[ref]["label"], model_dir, env if args.gpu else openblas_env(env),
                           "" if args.gpu else "float32", args, logs)

    def paired(n: int, round_: int) -> None:
        if worker is not None and n in PAIRED:
            worker.measure(n, round_)

    rounds: dict[str, dict[int, list[client.LevelResult]]] = {}

    def measure_round(key: str, server: Server, n: int, round_: int) -> client.LevelResult:
        level = measure_level(server, args, n, round_)
        rounds.setdefault(key, {}).setdefault(n, []).append(level)
        return level

    if args.sequential:  # start, measure, stop: one server process at a time
        for key, label, spec_env in runs:
            server = launch(key, label, spec_env)
            try:
                levels = []
                for n in args.stream_levels:
                    best = None
                    for round_ in range(level_rounds(args, n)):
                        if key == "ours":
                            paired(n, round_)
                        if measured(args, key, n, round_):
                            best = faster(best, measure_round(key, server, n, round_))
                    if best is not None:
                        levels.append(best)
                servers[key] = {"label": label, "levels": levels}
                finish(key, server)
            finally:
                stop_server(server)
            loads.append((f"after {label}", os.getloadavg()))
    else:  # all started (idle when not driven); each concurrency level runs on each server in turn
        live: dict[str, Server] = {}
        try:
            for key, label, spec_env in runs:
                live[key] = launch(key, label, spec_env)
                servers[key] = {"label": label, "levels": []}
            for n in args.stream_levels:
                best: dict[str, client.LevelResult | None] = dict.fromkeys(live)
                for round_ in range(level_rounds(args, n)):
                    paired(n, round_)
                    for key, server in live.items():
                        if measured(args, key, n, round_):
                            best[key] = faster(best[key], measure_round(key, server, n, round_))
                for key, level in best.items():
                    if level is not None:
                        servers[key]["levels"].append(level)
                loads.append((f"after {n} streams", os.getloadavg()))
            for key, server in live.items():
                finish(key, server)
            loads.append(("after the chats", os.getloadavg()))
        finally:
            for server in live.values():
                stop_server(server)
    if worker is not None:
        worker.close()
        raw[ref]["paired"] = {**worker.best(), "rounds": worker.rounds}
    for key in servers:
        servers[key]["rounds"] = rounds.get(key, {})

    if "fp32" in raw and args.raw_repeats > 1:  # again at the end: each figure is the best of the passes
        for _ in range(args.raw_repeats - 1):
            for key in ["fp32"]:  # the reference for our server's targets (bf16 is slow and informational)
                again = run_raw(raw[key]["label"], model_dir, openblas_env(env) if key == "fp32" else env,
                                "float32" if key == "fp32" else "", args)
                raw[key] = best_of(raw[key], again)
        loads.append(("after raw again", os.getloadavg()))

    body = report(args, command, started, loads, raw, servers, ours_info, time.monotonic() - t0, model_desc,
                  raw_llama, steal_share(steal0, cpu_times()))
    print()
    print(body)
    if not args.no_write:
        out = args.out or DOC
        write_doc(out, body, args.gpu)
        say(f"\nwrote {out}")
    return 0


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of this machine since boot, from Linux's /proc/stat; None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of CPU time the hypervisor took between two ``cpu_times()`` readings: a disturbed run shows."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def best_of(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Figure by figure, the faster of two raw passes (other load on the machine only ever slows one)."""
    out = dict(a)
    out["passes"] = a.get("passes", 1) + 1
    for part in ("single", "single_batchgen"):
        if part in a and part in b:
            out[part] = {k: (max(a[part][k], b[part][k]) if k.endswith("tps") else a[part][k]) for k in a[part]}
    by_n = {x["n"]: x for x in b["batch"]}
    out["batch"] = [{k: (max(x[k], by_n[x["n"]][k]) if k.endswith("tps") and x["n"] in by_n else x[k]) for k in x}
                    for x in a["batch"]]
    return out


def fp32_folder(model_dir: Path, env: dict[str, str]) -> Path:
    code = "import sys; from pathlib import Path; from bench.model import fp32_copy; print(fp32_copy(Path(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
