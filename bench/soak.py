"""Soak test: a fixed-concurrency mix of real traffic against the real Gunicorn server.

    make soak                      # 10 minutes, 8 clients, writes docs/reliability.md
    python -m bench.soak --minutes 2 --concurrency 8 [--write]

Streaming and plain chat, completions, model list and health calls, loopback only, bounded in
time and count. Reports requests by outcome, p50/p99 latency and time to first token, output
tokens per second, and the worker's memory as a time series: RSS, MLX's active and cached
buffers, the prompt cache, the C heap (in use / free in its arenas) and Python's object count,
sampled from the worker and /metrics every few seconds. Warm-up ends once the prompt cache has
reached 95 % of its bound and a fixed fraction of the run has passed (``--warmup``, 25 %; at most
two thirds of the run, when the machine is too slow to fill the cache sooner); growth
after warm-up is the highest RSS after it against the highest in its last minute, and the report
says whether the series has levelled off. The series goes to build/soak-series.csv.
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

from tests.support import DEFAULT_MODEL  # noqa: E402
from tests.support.server import start_server, stop_server  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 3?",
    "Name three colours.",
    "Explain what a CPU does.",
    "Tell me a fact about Paris.",
    "Give me a recipe for tea.",
]
# Warm-up lasts until the prompt cache has reached its bound: within 5 %, as eviction drops whole
# entries and keeps it a little under (measured: 252-256 MiB of 256 once full).
CACHE_FULL = 0.95
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
            body = {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.randint(16, 64),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
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
                url, body = (
                    f"{base}/v1/chat/completions",
                    {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}]},
                )
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


SERIES = [
    ("rss", None),
    ("mlx_active", "impetus_mlx_active_memory_bytes"),
    ("mlx_cache", "impetus_mlx_cache_memory_bytes"),
    ("prompt_cache", "impetus_prompt_cache_bytes"),
    ("malloc_in_use", "impetus_malloc_in_use_bytes"),
    ("malloc_free", "impetus_malloc_free_bytes"),
    ("py_objects", "impetus_python_gc_objects"),
]


def sample(base: str, pid: int) -> dict[str, float]:
    """One point of the memory series: the worker's RSS and the /metrics gauges that explain it."""
    point = {"rss": float(worker_rss(pid))}
    try:
        text = requests.get(f"{base}/metrics", timeout=30).text
    except requests.RequestException:
        return point
    gauges = {line.split(" ")[0]: line.split(" ")[-1] for line in text.splitlines() if not line.startswith("#")}
    for key, metric in SERIES:
        if metric is not None and metric in gauges:
            point[key] = float(gauges[metric])
    return point


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def keep_tail(path: Path) -> str:
    """The hand-written sections after the generated one (from its first following '## ' heading)."""
    text = path.read_text() if path.exists() else ""
    start = text.find("## Latest soak")
    cut = text.find("\n## ", start + 1) if start >= 0 else -1
    return text[cut:] if cut >= 0 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.25,
        help="fraction of the run that is warm-up at least; it also lasts until the prompt cache "
        "has reached 95%% of its bound (at most two thirds of the run)",
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--write", action="store_true", help="write the report to docs/reliability.md")
    args = parser.parse_args()

    import tempfile

    server = start_server(Path(tempfile.mkdtemp(prefix="soak-")), IMPETUS_MAX_BATCH="8", IMPETUS_MAX_QUEUE="16")
    tally, rng_seed = Tally(), 1234
    deadline = time.monotonic() + args.minutes * 60
    series: list[dict[str, float]] = []  # t (seconds from the start), done (requests answered), then SERIES
    warm_index: int | None = None
    cache_full_at: float | None = None
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
        cache_limit = requests.get(f"{server.url}/health", timeout=30).json()["prompt_cache_limit_bytes"]
        run_s = args.minutes * 60
        while any(t.is_alive() for t in threads):
            point = {
                "t": time.monotonic() - started,
                "done": float(sum(tally.outcomes.values())),
                **sample(server.url, server.process.pid),
            }
            series.append(point)
            print(
                f"{point['t']:6.0f} s {point['done']:5.0f} requests  "
                + "  ".join(
                    f"{k} {point[k] if k == 'py_objects' else point[k] / 2**20:.0f}" for k, _ in SERIES if k in point
                ),
                flush=True,
            )
            if cache_full_at is None and point.get("prompt_cache", 0) >= CACHE_FULL * cache_limit:
                cache_full_at = point["t"]
            if warm_index is None and (
                (cache_full_at is not None and point["t"] >= args.warmup * run_s) or point["t"] >= run_s * 2 / 3
            ):
                warm_index = len(series) - 1
            next_at = time.monotonic() + args.sample_every
            while time.monotonic() < next_at and any(t.is_alive() for t in threads):
                time.sleep(0.2)
        for t in threads:
            t.join()
        duration = time.monotonic() - started
        series.append(
            {"t": duration, "done": float(sum(tally.outcomes.values())), **sample(server.url, server.process.pid)}
        )
    finally:
        stop_server(server)
    if warm_index is None:
        warm_index = len(series) * 2 // 3
    csv = ROOT / "build" / "soak-series.csv"
    csv.parent.mkdir(exist_ok=True)
    columns = ["t", "done", *(k for k, _ in SERIES)]
    csv.write_text(
        "\n".join([",".join(columns), *(",".join(f"{p.get(c, float('nan')):.0f}" for c in columns) for p in series)])
        + "\n"
    )

    errors = {k: v for k, v in tally.outcomes.items() if not k.endswith((" 200", " 429", " 503"))}
    warm, after = series[warm_index], series[warm_index:]
    # MLX's buffer cache is emptied every 512 decode steps (mlx-lm) and refills to its bound within
    # seconds, so RSS is a saw: compare its top edge, the highest RSS of warm-up's last minute,
    # with the highest after warm-up, not two points that may fall on either edge.
    base = max(p["rss"] for p in series[: warm_index + 1] if p["t"] >= warm["t"] - 60)
    peak = max(after, key=lambda p: p["rss"])
    growth = peak["rss"] / base - 1 if base else float("nan")
    end_growth = series[-1]["rss"] / base - 1 if base else float("nan")
    # Levelled off: the last third of the post-warm-up series rose less than 1 % above the middle third's peak.
    third = max(1, len(after) // 3)
    late_rise = max(p["rss"] for p in after[-third:]) / max(p["rss"] for p in after[:-third] or after) - 1
    table = [
        p
        for i, p in enumerate(series)
        if i in (0, warm_index, len(series) - 1) or int(p["t"] // 60) != int(series[i - 1]["t"] // 60)
    ]
    series_rows = [
        f"| {p['t']:.0f}{' (warm)' if p is warm else ''} | {p['done']:.0f} | {mib(p['rss'])} | {mib(p.get('mlx_active'))} "
        f"| {mib(p.get('mlx_cache'))} | {mib(p.get('prompt_cache'))} | {mib(p.get('malloc_in_use'))} "
        f"| {mib(p.get('malloc_free'))} | {p.get('py_objects', float('nan')):.0f} |"
        for p in table
    ]
    warm_how = (
        f"prompt cache at {CACHE_FULL:.0%} of its bound after {cache_full_at:.0f} s, and at least "
        f"{args.warmup:.0%} of the run"
        if cache_full_at is not None and cache_full_at <= warm["t"]
        else "cut at two thirds of the run: the prompt cache had not yet "
        f"reached {CACHE_FULL:.0%} of its bound, so the growth below includes it filling"
    )
    rows = [
        f"| {kind} | {len(v)} | {pct(v, 0.5) * 1000:.0f} | {pct(v, 0.99) * 1000:.0f} |"
        for kind, v in sorted(tally.latency.items())
    ]
    report = "\n".join(
        [
            f"Soak run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
            f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
            f"`python -m bench.soak --minutes {args.minutes:g} --concurrency {args.concurrency}` "
            f"({duration:.0f} s, {sum(tally.outcomes.values())} requests).",
            "",
            "| outcome | count |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in sorted(tally.outcomes.items())],
            "",
            "| request | ok | p50 ms | p99 ms |",
            "|---|---|---|---|",
            *rows,
            "",
            f"- time to first token (streams): p50 {pct(tally.ttft, 0.5) * 1000:.0f} ms, "
            f"p99 {pct(tally.ttft, 0.99) * 1000:.0f} ms",
            f"- output tokens: {tally.tokens} ({tally.tokens / duration:.1f} tok/s aggregate)",
            f"- errors other than deliberate 429/503: {sum(errors.values())} {errors or ''} (target 0)",
            f"- worker RSS: {mib(series[0]['rss'])} MiB at the start; warm-up ended at {warm['t']:.0f} s ({warm_how}), "
            f"its last minute peaked at {mib(base)} MiB; peak after "
            f"warm-up {mib(peak['rss'])} MiB at {peak['t']:.0f} s (**{growth:+.1%}**; target < +5 %); "
            f"{mib(series[-1]['rss'])} MiB at the end ({end_growth:+.1%})",
            f"- plateau: the last third of the run after warm-up peaked {late_rise:+.1%} against the rest of it "
            f"({'levelled off' if late_rise < 0.01 else 'still rising'}; levelled off means < +1 %)",
            "",
            f"Memory series (MiB; one row a minute of {len(series)} samples, every {args.sample_every:g} s, "
            "all in build/soak-series.csv): RSS of the worker, MLX's active and cached buffers, the prompt cache, "
            "the C heap's bytes in use and freed-but-kept, and Python's gc-tracked objects.",
            "",
            "| s | requests | RSS | MLX active | MLX cache | prompt cache | malloc in use | malloc free | py objects |",
            "|---|---|---|---|---|---|---|---|---|",
            *series_rows,
        ]
    )
    print(report)
    if args.write:
        path = ROOT / "docs" / "reliability.md"
        head = (
            "# Reliability\n\nFigures from `make soak` (`python -m bench.soak`) and the fault tests in "
            "`tests/api/test_faults.py` (run by `make test`).\n\n## Latest soak\n\n"
        )
        path.write_text(head + report + "\n" + keep_tail(path))
        print(f"wrote {path}")
    return 1 if errors or growth > 0.05 else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
