"""Soak test: a fixed-concurrency mix of real traffic against the real Gunicorn server.

    make soak                      # 10 minutes, 8 clients, writes docs/reliability.md
    python -m bench.soak --minutes 2 --concurrency 8 [--write]

Streaming and plain chat, completions, model list and health calls, loopback only, bounded in
time and count. Reports requests by outcome, p50/p99 latency and time to first token, output
tokens per second, and the worker's RSS after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import DEFAULT_MODEL, start_server, stop_server  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "What is 17 times 3?", "Name three colours.",
           "Explain what a CPU does.", "Tell me a fact about Paris.", "Give me a recipe for tea."]
MIX = [("chat_stream", 4), ("chat", 2), ("completion", 2), ("models", 1), ("health", 1)]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(base: str, kind: str, rng: random.Random, tally: Tally) -> None:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        if kind == "chat_stream":
            body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": rng.randint(16, 64), "stream": True, "stream_options": {"include_usage": True}}
            with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            status = 599
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
        elif kind in ("chat", "completion"):
            if kind == "chat":
                url, body = f"{base}/v1/chat/completions", {
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
            else:
                url, body = f"{base}/v1/completions", {"prompt": rng.choice(PROMPTS)}
            r = requests.post(url, json={"model": DEFAULT_MODEL, "max_tokens": rng.randint(8, 48), **body}, timeout=300)
            status = r.status_code
            if status == 200:
                tokens = r.json()["usage"]["completion_tokens"]
        else:
            status = requests.get(f"{base}{'/v1/models' if kind == 'models' else '/health'}", timeout=30).status_code
    except requests.RequestException as exc:
        status, kind = 0, f"{kind}:{type(exc).__name__}"
    elapsed = time.perf_counter() - start
    with tally.lock:
        tally.outcomes[f"{kind} {status}"] += 1
        if status == 200:
            tally.latency[kind].append(elapsed)
            tally.tokens += tokens
            if first is not None:
                tally.ttft.append(first)


def worker_rss(pid: int) -> int:
    children = psutil.Process(pid).children()
    return int(children[0].memory_info().rss) if children else 0


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--warmup", type=float, default=240.0,
                        help="at most this many seconds (and half the run) for the caches to fill before the "
                             "baseline RSS is taken")
    parser.add_argument("--write", action="store_true", help="write the report to docs/reliability.md")
    args = parser.parse_args()

    import tempfile

    server = start_server(Path(tempfile.mkdtemp(prefix="soak-")), IMPETUS_MAX_BATCH="8", IMPETUS_MAX_QUEUE="16")
    tally, rng_seed = Tally(), 1234
    deadline = time.monotonic() + args.minutes * 60
    warm_until = time.monotonic() + min(args.warmup, args.minutes * 30)  # at most half the run
    rss: dict[str, int] = {}
    issued = 0
    issued_lock = threading.Lock()

    def client(n: int) -> None:
        nonlocal issued
        rng = random.Random(rng_seed + n)
        kinds = [k for k, w in MIX for _ in range(w)]
        while time.monotonic() < deadline:
            with issued_lock:
                if issued >= args.max_requests:
                    return
                issued += 1
            one_request(server.url, rng.choice(kinds), rng, tally)

    started = time.monotonic()
    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.concurrency)]
        for t in threads:
            t.start()
        # Warm-up ends once the prompt cache has filled (it then holds steady) or at the time limit.
        while time.monotonic() < warm_until:
            state = requests.get(f"{server.url}/health", timeout=30).json()
            if state["prompt_cache_bytes"] >= 0.9 * state["prompt_cache_limit_bytes"]:
                break
            time.sleep(1.0)
        rss["warm-up seconds"] = int(time.monotonic() - started)
        rss["after warm-up"] = worker_rss(server.process.pid)
        for t in threads:
            t.join()
        duration = time.monotonic() - started
        rss["end"] = worker_rss(server.process.pid)
    finally:
        stop_server(server)

    errors = {k: v for k, v in tally.outcomes.items() if not k.endswith((" 200", " 429", " 503"))}
    growth = rss["end"] / rss["after warm-up"] - 1 if rss.get("after warm-up") else float("nan")
    rows = [f"| {kind} | {len(v)} | {pct(v, 0.5) * 1000:.0f} | {pct(v, 0.99) * 1000:.0f} |"
            for kind, v in sorted(tally.latency.items())]
    report = "\n".join([
        f"Soak run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"`python -m bench.soak --minutes {args.minutes:g} --concurrency {args.concurrency}` "
        f"({duration:.0f} s, {sum(tally.outcomes.values())} requests).",
        "",
        "| outcome | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(tally.outcomes.items())],
        "",
        "| request | ok | p50 ms | p99 ms |", "|---|---|---|---|", *rows,
        "",
        f"- time to first token (streams): p50 {pct(tally.ttft, 0.5) * 1000:.0f} ms, "
        f"p99 {pct(tally.ttft, 0.99) * 1000:.0f} ms",
        f"- output tokens: {tally.tokens} ({tally.tokens / duration:.1f} tok/s aggregate)",
        f"- worker RSS: {rss.get('after warm-up', 0) / 2**20:.0f} MiB after warm-up "
        f"({rss.get('warm-up seconds', 0)} s, until the prompt cache filled), "
        f"{rss.get('end', 0) / 2**20:.0f} MiB at the end ({growth:+.1%}; target < +5 %)",
        f"- errors other than deliberate 429/503: {sum(errors.values())} {errors or ''} (target 0)",
    ])
    print(report)
    if args.write:
        path = ROOT / "docs" / "reliability.md"
        head = ("# Reliability\n\nFigures from `make soak` (`python -m bench.soak`) and the fault tests in "
                "`tests/api/test_faults.py` (run by `make test`).\n\n## Latest soak\n\n")
        path.write_text(head + report + "\n")
        print(f"wrote {path}")
    return 1 if errors or growth > 0.05 else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
