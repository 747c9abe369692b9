"""The agent workload bench (issue 27): concurrent multi-turn sessions on a long shared system prompt.

    make bench-agent                      # 4 sessions x 6 turns; writes its section of docs/performance.md
    make bench-agent ARGS='--quick'       # a smoke run: 2 sessions x 2 turns on a 2,000-token prompt
    python -m bench.agent --no-write      # printed only
    python -m bench.agent --shape qwen2.5-0.5b --skip-mlx-server --skip-llamacpp  # at a real model's shape

``--sessions`` (4) agent sessions share a ``--system-tokens`` (~4,000) system prompt that holds a coding
agent's tool definitions (bench/agent_workload.py). Each runs ``--turns`` (6) turns: a ~``--turn-tokens``
(300) message (the task, then tool results and user follow-ups in turn) is added to its history with
the previous answer, and ``--max-tokens`` (100) are generated, greedy. The sessions start each turn
together (the turn's TTFT p50/p99 is over the sessions). The bench model never ends a generation early
(bench/model.py), so every answer has ``--max-tokens`` tokens; the table shows the tokens counted.

Servers, one at a time (each started by bench/servers.py, the launcher ``make bench`` uses), on the bench
model with its context bound raised to 8,192 tokens (the same weights and tokenizer; a full session
needs ~6,600): ours on MLX (``IMPETUS_BACKEND=mlx``, ``IMPETUS_PROMPT_CACHE_DISK_BYTES`` set), ours on
llama.cpp (the bench's f32 GGUF), ``python -m mlx_lm.server`` on the fp32 copy with OpenBLAS (what ours
computes in on a Linux CPU; as shipped, bf16 is 10x slower at prefill here) and llama-cpp-python's server
on the GGUF (as shipped: one request at a time, its single context's prefix reused).

The reference for "later turns' TTFT vs prefilling only their new tokens": fresh prompts of a later
turn's new tokens (its message plus the previous answer), sent alone and ``--sessions`` at once (the
workload's concurrency, which the goal's ratio uses). Peak RSS is the sum over the server's process
tree (Gunicorn's master and worker), sampled every 100 ms. Then our MLX server is restarted on the same
models folder: a cold prompt of the same length (no shared prefix) against session 0's first turn again,
which the disk tier, where there is one, holds.

``--shape`` runs it on the bench model built at a named real model's shape (bench/model.py ``SHAPES``:
``qwen2.5-0.5b``), into ``build/bench-model-SHAPE-8k``; its figures go between markers of their own in
the same section (``bench-agent-SHAPE``), beside the bench model's. On a loaded 2-core CPU its first turn
can pass our server's 600 s request timeout: add ``--ours-env IMPETUS_REQUEST_TIMEOUT=0`` (mlx_lm.server has none).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench import client  # noqa: E402
from bench.agent_report import TITLE, markers, render  # noqa: E402
from bench.agent_workload import Workload, counter, fresh_prompt, system_prompt, turn_message, workload  # noqa: E402
from bench.measure import warm_up  # noqa: E402
from bench.model import BENCH, SHAPES, Spec, default_models_dir, is_built  # noqa: E402
from bench.report import DOC, say, write_doc  # noqa: E402
from bench.servers import base_env, gguf_file, openblas_env, start  # noqa: E402
from tests.support.server import Server, stop_server  # noqa: E402

CONTEXT = 8192
SPEC = replace(BENCH, context=CONTEXT)
DISK_SETTING = "IMPETUS_PROMPT_CACHE_DISK_BYTES"


def shape_spec(shape: str) -> Spec:
    """The named shape (bench/model.py ``SHAPES``) with the workload's context bound."""
    return replace(SHAPES[shape], context=CONTEXT)


def default_model_dir(shape: str) -> Path:
    return ROOT / "build" / ("bench-model-8k" if shape == "bench" else f"bench-model-{shape}-8k")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 sessions x 2 turns, 2,000-token prompt")
    p.add_argument("--sessions", type=int, help="concurrent sessions (default 4)")
    p.add_argument("--turns", type=int, help="turns a session (default 6)")
    p.add_argument("--system-tokens", type=int, help="shared system prompt + tools, tokens (default 4000)")
    p.add_argument("--turn-tokens", type=int, help="tokens each turn adds (default 300)")
    p.add_argument("--max-tokens", type=int, help="tokens generated a turn (default 100)")
    p.add_argument("--disk-bytes", type=int, default=2 << 30, help=f"{DISK_SETTING} for ours (default 2 GiB)")
    p.add_argument("--skip-mlx-server", action="store_true", help="no python -m mlx_lm.server")
    p.add_argument("--skip-llamacpp", action="store_true", help="no llama.cpp rows (ours on it, llama-cpp-python)")
    p.add_argument("--skip-restart", action="store_true", help="no restart of our server")
    p.add_argument(
        "--only",
        default="",
        metavar="KEY[,KEY]",
        help="only these servers: ours, mlx+openblas fp32, llama-cpp-python server, ours llama.cpp",
    )
    p.add_argument("--ours-env", action="append", default=[], metavar="IMPETUS_X=VALUE", help="a setting for ours")
    p.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="the bench model's shape (default bench)")
    p.add_argument("--model-dir", type=Path, help="bench model folder (default build/bench-model[-SHAPE]-8k)")
    p.add_argument("--models-dir", type=Path, help="where the default model (the tokenizer's source) lives")
    p.add_argument("--out", type=Path, help=f"markdown file to write (default {DOC.relative_to(ROOT)})")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    quick = args.quick
    for key, full, small in (
        ("sessions", 4, 2),
        ("turns", 6, 2),
        ("system_tokens", 4000, 2000),
        ("turn_tokens", 300, 100),
        ("max_tokens", 100, 16),
    ):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    args.n_ctx = CONTEXT  # llama-cpp-python's server (bench/servers.py)
    args.spec = shape_spec(args.shape)  # the report's model line and FLOP floor
    args.prompt_words = 12  # bench.measure.warm_up's prompts
    return args


class RssSampler(threading.Thread):
    """The resident bytes of a process and its children, summed, every ``interval`` seconds; the peak
    overall and while each turn (``turn``, set by the caller; 0: outside the turns) ran."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.turn = 0
        self.peak = 0
        self.peaks: dict[int, int] = {}
        self._stop_event = threading.Event()

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss, turn = self.sample(), self.turn
            self.peak = max(self.peak, rss)
            self.peaks[turn] = max(self.peaks.get(turn, 0), rss)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def chat_url(server: Server) -> str:
    return server.url + "/v1/chat/completions"


def wave(server: Server, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[client.Result]:
    """One request per conversation, all sent at once (one thread and connection each)."""
    results: list[client.Result] = [client.Result(ok=False, error="not run")] * len(conversations)

    def one(i: int) -> None:
        with client.Session() as session:
            body = {"model": server.model, "messages": conversations[i], "max_tokens": max_tokens}
            results[i] = client.stream_request(session, chat_url(server), body)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def reference(server: Server, args: argparse.Namespace, count: Any, nonce: str) -> dict[str, Any]:
    """TTFT of fresh prompts as long as a later turn's new tokens: alone (median of 3) and all sessions at once."""
    size = args.turn_tokens + args.max_tokens
    alone = [
        wave(server, [[{"role": "user", "content": fresh_prompt(size, count, f"{nonce}-a{i}")}]], 4)[0]
        for i in range(3)
    ]
    together = wave(
        server,
        [[{"role": "user", "content": fresh_prompt(size, count, f"{nonce}-w{i}")}] for i in range(args.sessions)],
        args.max_tokens,
    )
    ok = [r for r in alone + together if r.ok]
    return {
        "tokens": size,
        "prompt_tokens": statistics.median([r.prompt_tokens for r in ok]) if ok else 0,
        "alone": statistics.median([r.ttft for r in alone if r.ok]) if any(r.ok for r in alone) else float("nan"),
        "together": client.percentile([r.ttft for r in together if r.ok], 0.5),
        "errors": [r.error for r in alone + together if not r.ok],
    }


def sessions(server: Server, args: argparse.Namespace, work: Workload, count: Any, rss: RssSampler) -> dict[str, Any]:
    """The workload: every session's turn k sent together, then turn k+1 with the answers appended.

    After each later turn, ``--sessions`` fresh prompts of its new tokens' size go at once (``paired``, not
    in the total time): on a shared machine the load moves between the reference at the start and turn 6,
    and a reference taken right after the turn divides out most of it (paired rounds)."""
    histories = [[{"role": "system", "content": work.system}] for _ in range(args.sessions)]
    turns: list[list[client.Result]] = []
    paired: dict[int, float] = {}
    start, aside = time.perf_counter(), 0.0
    size = args.turn_tokens + args.max_tokens
    for turn in range(1, args.turns + 1):
        for s, history in enumerate(histories):
            history.append({"role": "user", "content": turn_message(s, turn, args.turn_tokens, count)})
        rss.turn = turn
        results = wave(server, histories, args.max_tokens)
        rss.turn = 0
        for history, result in zip(histories, results, strict=True):
            history.append({"role": "assistant", "content": result.text})
        turns.append(results)
        if turn > 1:
            t0 = time.perf_counter()
            fresh = [
                [{"role": "user", "content": fresh_prompt(size, count, f"paired-{turn}-{i}")}]
                for i in range(args.sessions)
            ]
            paired[turn] = client.percentile([r.ttft for r in wave(server, fresh, 4) if r.ok], 0.5)
            aside += time.perf_counter() - t0
        ok = [r for r in results if r.ok]
        say(
            f"  turn {turn}: TTFT p50 {client.percentile([r.ttft for r in ok], 0.5) * 1000:7.0f} ms, "
            f"{sum(r.tokens for r in ok)} tokens, {len(ok)}/{len(results)} ok, RSS peak "
            f"{rss.peaks.get(turn, 0) / 2**20:.0f} MiB{'  errors: ' + results[0].error if not results[0].ok else ''}"
            + (f"; fresh right after {paired[turn] * 1000:.0f} ms" if turn in paired else "")
        )
    return {"turns": turns, "wall": time.perf_counter() - start - aside, "paired": paired}


def cache_metrics(server: Server) -> dict[str, float]:
    """Our server's prompt-cache lines of /metrics (every tier it reports)."""
    try:
        text = requests.get(server.url + "/metrics", timeout=10).text
    except requests.RequestException:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("impetus_prompt_cache"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def has_disk_tier() -> bool:
    """Whether this checkout's settings know the disk tier (helper C3's ``prompt_cache_disk_bytes``)."""
    code = "from gerdsen_ai_server.config import Settings; print('prompt_cache_disk_bytes' in Settings.model_fields)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().endswith("True")


def restart(
    key: str, label: str, spec: Any, env: dict[str, str], args: argparse.Namespace, paths: dict[str, Path], work: Any
) -> dict[str, Any]:
    """Our server again on the same models folder: a cold prompt of the same length, then session 0's first turn."""
    server = start(key, label + ", restarted", spec, env, paths["model"], paths["models"], args, paths["logs"])
    try:
        warm_up(server, args)
        count = counter(paths["model"] / "tokenizer.json")
        cold_system = system_prompt(args.system_tokens, count, nonce="Cold run. ")
        first = turn_message(0, 1, args.turn_tokens, count)
        before = cache_metrics(server)
        cold = wave(server, [[{"role": "system", "content": cold_system}, {"role": "user", "content": first}]], 4)[0]
        warm = wave(server, [[{"role": "system", "content": work.system}, {"role": "user", "content": first}]], 4)[0]
        return {"cold": cold, "disk": warm, "metrics_before": before, "metrics_after": cache_metrics(server)}
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = os.environ.get("IMPETUS_BENCH_COMMAND") or "python -m bench.agent " + shlex.join(given)
    t0, started = time.monotonic(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    env = base_env()
    model_dir = (args.model_dir or default_model_dir(args.shape)).resolve()
    if not is_built(model_dir, args.spec):
        say(f"building the bench model ({args.shape} shape, context {CONTEXT}) into {model_dir} ...")
        code = (
            "import sys; from pathlib import Path; from bench.agent import shape_spec; from bench.model import build; "
            "build(Path(sys.argv[1]), shape_spec(sys.argv[3]), Path(sys.argv[2]))"
        )
        models = str(args.models_dir or default_models_dir())
        cmd = [sys.executable, "-c", code, str(model_dir), models, args.shape]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    count = counter(model_dir / "tokenizer.json")
    work = workload(model_dir / "tokenizer.json", args.system_tokens, args.turn_tokens)
    logs = Path(tempfile.mkdtemp(prefix="impetus-agent-"))
    paths = {"model": model_dir, "models": logs / "models", "logs": logs}
    paths["models"].mkdir()
    disk = has_disk_tier()
    say(
        f"agent bench: {args.sessions} sessions x {args.turns} turns, system prompt {work.system_tokens} tokens; "
        f"disk tier {'present' if disk else 'not in this checkout'}; logs in {logs}"
    )

    ours = {"IMPETUS_BACKEND": "mlx", DISK_SETTING: str(args.disk_bytes)}
    runs: list[tuple[str, str, Any]] = [("ours", "ours, MLX", ours)]
    if not args.skip_mlx_server:
        runs.append(("mlx+openblas fp32", "mlx_lm.server, fp32 copy + OpenBLAS", (openblas_env(env), None)))
    if not args.skip_llamacpp:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is not None:
            gguf = gguf_file(model_dir, env)
            runs.append(("llama-cpp-python server", "llama-cpp-python server (f32 GGUF)", gguf))
            runs.append(("ours llama.cpp", "ours, llama.cpp (f32 GGUF)", gguf))

    if args.only:
        runs = [run for run in runs if run[0] in {key.strip() for key in args.only.split(",")}]
    results: dict[str, dict[str, Any]] = {}
    restarted: dict[str, Any] | None = None
    for key, label, spec in runs:
        server = start(key, label, spec, env, model_dir, paths["models"], args, logs)
        rss = RssSampler(server.process.pid)
        rss.start()
        try:
            warm_up(server, args)
            loaded = rss.sample()
            ref = reference(server, args, count, key)
            say(
                f"{label}: fresh {ref['tokens']}-token prompt TTFT alone {ref['alone'] * 1000:.0f} ms, "
                f"{args.sessions} at once {ref['together'] * 1000:.0f} ms"
            )
            run = sessions(server, args, work, count, rss)
            info = {**server.info, "cache": cache_metrics(server) if key == "ours" else {}}
        finally:
            rss.stop()
            stop_server(server)
        results[key] = {
            "label": label,
            "ref": ref,
            **run,
            "rss_loaded": loaded,
            "rss_peak": rss.peak,
            "rss_turns": dict(rss.peaks),
            "info": info,
            "load": os.getloadavg()[1],  # the machine's 5-minute load as this server's turns ended
        }
        if key == "ours" and not args.skip_restart:
            restarted = restart(key, label, spec, env, args, paths, work)
            restarted["disk_tier"] = disk
            say(
                f"{label} restarted: cold {restarted['cold'].ttft * 1000:.0f} ms, "
                f"first turn again {restarted['disk'].ttft * 1000:.0f} ms"
            )

        if not args.no_write:  # after each server: a run cut short still leaves what it measured
            write_doc(
                args.out or DOC,
                render(args, command, started, time.monotonic() - t0, work, results, restarted),
                markers=markers(args.shape),
                title=TITLE,
            )

    body = render(args, command, started, time.monotonic() - t0, work, results, restarted)
    print()
    print(body)
    if not args.no_write:
        write_doc(args.out or DOC, body, markers=markers(args.shape), title=TITLE)
        say(f"\nwrote {args.out or DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
