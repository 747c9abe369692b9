"""The micro-model proxy for per-token host overhead (issue 28): the tiny bench model on the CPU, raw mlx-lm
against our server and ``python -m mlx_lm.server``, side by side in one run.

    make bench ARGS='--proxy'                       # ~1-2 min on 2 cores; writes its section of docs/performance.md
    python -m bench.overhead --rounds 3 --no-write  # the same, printed only

Why a proxy: where users run Impetus (Metal, MLX's CUDA build) a decode step of a small model takes about a
millisecond, so the server's Python per token decides the speed. Here the bench's tiny model (``bench/model.py``
``TINY``: hidden 64, 2 layers) computes a step in a fraction of a millisecond on the CPU, so what is left of a
step's time is host overhead, the same overhead as on a GPU, measurable on any machine.

Every figure is in float32 with OpenBLAS preloaded, the configuration our server computes in on a Linux CPU:
raw mlx-lm converts the bf16 checkpoint at load (``bench.raw --dtype float32``, the conversion our server
applies), ``mlx_lm.server`` serves an fp32 copy (``bench.model.fp32_copy``). Greedy, ``--max-tokens`` (256) a
request. In each of ``--rounds`` rounds: one raw pass (``stream_generate`` on one prompt, ``batch_generate`` on
8 and 16), then each concurrency level on each server in turn. The table shows each figure's best round; the
ratios are the median of the rounds' ratios (figures taken seconds apart), as ``bench.run`` does.

Per-token host time: one decode step serves every running stream, so at N streams a step takes
N / aggregate tok/s (one stream: 1 / its decode rate, first token excluded, as raw ``stream_generate``'s
``generation_tps``). "Our host overhead per step" is our step minus the raw step at the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import client  # noqa: E402
from bench.measure import measure_level, run_raw, warm_up  # noqa: E402
from bench.model import TINY, default_models_dir, default_out, is_built  # noqa: E402
from bench.profiling import CPU_GROUPS, thread_cpu  # noqa: E402
from bench.report import DOC, device_label, machine, say, versions, write_doc  # noqa: E402
from bench.servers import accelerator, base_env, openblas_env, start  # noqa: E402
from bench.targets import fmt  # noqa: E402
from gerdsen_ai_server.runtime.blas import OPENBLAS_IDLE_SPIN, find_openblas  # noqa: E402
from tests.support.server import Server, stop_server  # noqa: E402

BEGIN, END = "<!-- bench-proxy:begin -->", "<!-- bench-proxy:end -->"
TITLE = "## Host overhead: the micro-model proxy"
SERVERS = {"ours": "ours (impetus serve)", "mlx": "mlx_lm.server (fp32 copy, OpenBLAS)"}
# (name, what it compares, the threshold, what is divided by what) -- issue 28's targets on the proxy
TARGETS = (
    ("one stream: ours / raw `stream_generate`", 0.90, ("ours", 1), ("raw", 1)),
    ("8 streams: ours / raw `batch_generate`-8", 0.85, ("ours", 8), ("raw", 8)),
    ("16 streams: ours / raw `batch_generate`-16", 0.85, ("ours", 16), ("raw", 16)),
    ("8 streams: ours / `mlx_lm.server`", 1.2, ("ours", 8), ("mlx", 8)),
    ("16 streams: ours / `mlx_lm.server`", 1.2, ("ours", 16), ("mlx", 16)),
)

Figures = dict[tuple[str, int], float]  # (who, streams) -> tok/s: "raw", "ours", "mlx"
Split = dict[int, dict[str, float]]  # streams -> CPU microseconds a token: ours by thread group, and the client
SPLIT_LABELS = {
    "engine": "engine thread",
    "http": "HTTP threads (SSE, hand-off)",
    "native": "native threads (MLX compute, OpenBLAS)",
    "other": "other Python threads",
    "ours": "**our server, all its threads**",
    "raw_main": "raw mlx-lm: its Python thread",
    "raw_native": "raw mlx-lm: native threads (MLX compute, OpenBLAS)",
    "raw": "**raw mlx-lm, all its threads**",
    "client": "the bench's client (same cores)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds; table: best round, ratios: median (default 5)")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens a request (default 256)")
    p.add_argument("--streams", default="1,8,16", help="concurrency levels (default 1,8,16)")
    p.add_argument("--requests-per-stream", type=int, default=2, help="requests each stream sends (default 2)")
    p.add_argument("--min-requests", type=int, default=4, help="at least this many requests a level (default 4)")
    p.add_argument("--prompt-words", type=int, default=12, help="words per completion prompt (~2.7 tokens each)")
    p.add_argument("--skip-mlx-server", action="store_true", help="do not run python -m mlx_lm.server")
    p.add_argument(
        "--raw-as-shipped",
        action="store_true",
        help="raw mlx-lm without our server's compiled decode step and OpenBLAS thread timeout (default: with both)",
    )
    p.add_argument("--ours-env", action="append", default=[], metavar="IMPETUS_X=VALUE", help="a setting for ours")
    p.add_argument("--model-dir", type=Path, help="tiny bench model folder (default build/bench-model-tiny)")
    p.add_argument("--models-dir", type=Path, help="where the default model is converted (the tokenizer source)")
    p.add_argument("--out", type=Path, help=f"markdown file to write (default {DOC.relative_to(ROOT)})")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.stream_levels = [int(s) for s in str(args.streams).split(",") if s.strip()]
    args.batch_sizes = [n for n in args.stream_levels if n > 1] or [8]
    args.ours_env = ["IMPETUS_BACKEND=mlx", *args.ours_env]  # the proxy measures the MLX engine's host path
    args.tiny = False  # bench.measure's raw runs: three one-stream runs, the median
    args.raw_compiled = not args.raw_as_shipped  # bench.measure.raw_cmd: bench.raw --compiled
    return args


def raw_figures(raw: dict[str, Any]) -> Figures:
    """One raw pass's limits: one stream's decode rate, ``batch_generate``'s tokens over wall time."""
    out = {("raw", 1): float(raw["single"]["decode_tps"])}
    if "single_batchgen" in raw:  # the same prompt through BatchGenerator alone: what both servers decode with
        out[("batchgen", 1)] = float(raw["single_batchgen"]["decode_tps"])
    out.update({("raw", int(b["n"])): float(b["e2e_tps"]) for b in raw["batch"]})
    return out


def raw_split(raw: dict[str, Any]) -> Split:
    """One raw pass's CPU microseconds a token by thread (``bench.raw``): one stream (``stream_generate``)
    and each ``batch_generate`` size."""
    runs = {1: raw["single"], **{int(b["n"]): b for b in raw["batch"]}}
    return {
        n: {
            "raw_main": r["cpu_main_us"],
            "raw_native": r["cpu_native_us"],
            "raw": r["cpu_main_us"] + r["cpu_native_us"],
        }
        for n, r in runs.items()
        if "cpu_main_us" in r
    }


def level_figure(level: client.LevelResult) -> float:
    """One stream: its decode rate (first token excluded, like ``generation_tps``); N: aggregate tok/s."""
    return level.stream_decode_tps if level.streams == 1 else level.aggregate_tps


def step_ms(streams: int, tps: float) -> float:
    """Milliseconds a decode step takes when ``streams`` share it at ``tps`` tokens a second in all."""
    return streams / tps * 1000 if tps > 0 else float("nan")


def best(rounds: list[Figures]) -> Figures:
    out: Figures = {}
    for figures in rounds:
        for key, value in figures.items():
            if value == value and (key not in out or value > out[key]):
                out[key] = value
    return out


def median_ratios(rounds: list[Figures]) -> dict[str, tuple[float, float, int]]:
    """Each target's (median of the rounds' ratios, threshold, rounds) where both sides were measured."""
    out = {}
    for name, threshold, num, den in TARGETS:
        ratios = [r[num] / r[den] for r in rounds if num in r and den in r and r[den] > 0 and r[num] == r[num]]
        if ratios:
            out[name] = (statistics.median(ratios), threshold, len(ratios))
    return out


def measure_split(level: client.LevelResult, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU microseconds a token of one level: ours by thread group, and the client process's."""
    tokens = max(1, level.tokens)
    split = {group: (after[group] - before[group]) / tokens * 1e6 for group in CPU_GROUPS}
    split["ours"] = sum(split.values())
    split["client"] = level.client_cores * level.wall / tokens * 1e6
    return split


def render_split(splits: list[Split], levels: list[int]) -> list[str]:
    """Where the host time sits: ours, each thread group's CPU a token, the median of the rounds."""
    if not splits:
        return []
    shown = [n for n in levels if any(n in s for s in splits)]
    lines = [
        "",
        "Where the host time sits: CPU microseconds a token (median of the rounds), our server by thread "
        "group (psutil, each OS thread; threads named by py-spy), raw mlx-lm in the same rounds (its calling "
        "thread and the rest of its process; one stream: `stream_generate`) and the bench's client:",
        "",
        "| CPU µs / token | " + " | ".join(f"{n} stream{'s' * (n > 1)}" for n in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for key, label in SPLIT_LABELS.items():
        cells = []
        for n in shown:
            values = [s[n][key] for s in splits if key in s.get(n, {})]
            cells.append(f"{statistics.median(values):.0f}" if values else "")
        if any(c not in ("", "0") for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render(
    rounds: list[Figures], args: argparse.Namespace, header: list[str], splits: list[Split] | None = None
) -> str:
    """The proxy's section: the run, the table of tok/s and per-step host time, the targets, how to read it."""
    top = best(rounds)
    labels = {"raw": "raw `stream_generate`", "batchgen": "raw `BatchGenerator` alone, one prompt", **SERVERS}
    lines = [
        *header,
        "",
        "| what | streams | tok/s | ms / step | ms / token | our host overhead per step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for who in ("raw", "batchgen", "ours", "mlx"):
        for n in args.stream_levels:
            if (who, n) not in top:
                continue
            tps = top[(who, n)]
            label = labels[who] if who != "raw" or n == 1 else f"raw `batch_generate`-{n}"
            over = ""
            if who == "ours" and ("raw", n) in top:
                over = f"{step_ms(n, tps) - step_ms(n, top[('raw', n)]):+.2f}"
            lines.append(f"| {label} | {n} | {fmt(tps)} | {fmt(step_ms(n, tps), 2)} | {fmt(1000 / tps, 3)} | {over} |")
    lines += ["", "| target (issue 28, on the proxy) | value | target | |", "|---|---|---|---|"]
    for name, (value, threshold, n) in median_ratios(rounds).items():
        shown = f"{value:.2f}x" if threshold > 1 else f"{value:.0%}"
        want = f">= {threshold:.1f}x" if threshold > 1 else f">= {threshold:.0%}"
        verdict = "**met**" if value >= threshold else "not met"
        lines.append(f"| {name} | {shown} (median of {n} round{'s' * (n > 1)}) | {want} | {verdict} |")
    lines += render_split(splits or [], args.stream_levels)
    lines += [
        "",
        "How to read it: on a GPU a decode step of a small model takes about a millisecond, so the host's "
        "Python per token decides the speed; here the tiny model's forward pass is a fraction of a "
        "millisecond on the CPU, so what is left of a step is host overhead, the same as on a GPU. "
        "ms / step is the time one decode step takes for all the streams it serves (N streams: N / aggregate "
        "tok/s; one stream: its decode rate, first token excluded); ms / token is one over the tok/s. Our host "
        "overhead per step is our step minus raw mlx-lm's at the same size: the cost of the server around "
        "`BatchGenerator` (scheduling, detokenizing, the hand-off to HTTP threads, SSE). The client runs on "
        "the same machine and takes its share of the cores at the higher stream counts. Raw `stream_generate` "
        "(the issue's one-stream reference) has per-token costs of its own (its detokenizer, a response object "
        "a token); `BatchGenerator` alone on one prompt, shown for information, is what both servers decode with.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = os.environ.get("IMPETUS_BENCH_COMMAND") or "python -m bench.overhead " + shlex.join(given)
    t0, started = time.monotonic(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    env = base_env()
    model_dir = (args.model_dir or default_out(TINY)).resolve()
    models_dir = args.models_dir or default_models_dir()
    if not is_built(model_dir, TINY):
        say(f"building the tiny bench model into {model_dir} ...")
        cmd = [sys.executable, "-m", "bench.model", "--tiny", "--out", str(model_dir), "--models-dir", str(models_dir)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    config = json.loads((model_dir / "config.json").read_text())
    gpu = accelerator(env)
    if gpu:
        say(f"note: MLX computes on a GPU here ({gpu}): the proxy is meant for the CPU")
    logs = Path(tempfile.mkdtemp(prefix="impetus-proxy-"))
    say(f"micro-model proxy: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers; logs in {logs}")

    live: dict[str, Server] = {}
    rounds: list[Figures] = []
    splits: list[Split] = []
    info: dict[str, Any] = {}
    raw_compiled = False
    try:
        live["ours"] = start("ours", SERVERS["ours"], {}, env, model_dir, models_dir, args, logs)
        info = dict(live["ours"].info)
        if not args.skip_mlx_server:
            spec = (openblas_env(env), None)  # None: serve the fp32 copy
            live["mlx"] = start("mlx+openblas fp32", SERVERS["mlx"], spec, env, model_dir, models_dir, args, logs)
        for server in live.values():
            warm_up(server, args)
        raw_env = openblas_env(env)
        if args.raw_compiled:  # the OpenBLAS setting our server starts with (runtime/blas.py)
            raw_env.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_IDLE_SPIN)
        cpu = thread_cpu(live["ours"])  # None without py-spy: no split
        for round_ in range(args.rounds):
            say(f"round {round_ + 1} of {args.rounds}")
            raw = run_raw("fp32, OpenBLAS", model_dir, raw_env, "float32", args)
            figures = raw_figures(raw)
            raw_compiled = bool(raw.get("compiled"))
            split: Split = raw_split(raw)
            for n in args.stream_levels:
                for key, server in live.items():
                    before = cpu() if cpu is not None and key == "ours" else None
                    level = measure_level(server, args, n, round_)
                    figures[(key, n)] = level_figure(level)
                    if before is not None:
                        split.setdefault(n, {}).update(measure_split(level, before, cpu()))
            rounds.append(figures)
            if split:
                splits.append(split)
    finally:
        for server in live.values():
            stop_server(server)

    m, v = machine(), versions()
    header = [
        f"Run {started} on {m['platform']}, {m['cpu']}, {m['cores']} cores, {m['memory']}; MLX computes on "
        f"{device_label(gpu)}; mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, impetus {v['impetus']}. "
        f"OpenBLAS: {find_openblas() or 'not installed'}.",
        "",
        f"Command: `{command}` ({(time.monotonic() - t0) / 60:.1f} min). Model: the tiny bench model (hidden "
        f"{config['hidden_size']}, {config['num_hidden_layers']} layers, vocab {config['vocab_size']}), float32 "
        f"everywhere; {args.max_tokens} tokens a request, greedy; {args.rounds} round(s), each figure its best round. "
        f"Our server: IMPETUS_BACKEND=mlx, compute dtype {info.get('compute_dtype', '?')}, "
        f"BLAS {info.get('blas', '?')}, IMPETUS_MAX_BATCH=16. Raw mlx-lm: "
        + (
            "the forward pass our server runs (its compiled one-token step, engine/compiled.py, and the "
            f"OPENBLAS_THREAD_TIMEOUT={OPENBLAS_IDLE_SPIN} it starts with), so what differs is the server around "
            "the step."
            if raw_compiled
            else "as shipped (mlx-lm's own decode step; our server may compile its step where raw does not)."
        ),
    ]
    body = render(rounds, args, header, splits)
    print()
    print(body)
    if not args.no_write:
        out = args.out or DOC
        write_doc(out, body, markers=(BEGIN, END), title=TITLE)
        say(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
