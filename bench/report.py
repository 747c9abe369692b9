"""The run's report: progress lines as it goes, then markdown tables with the machine, versions, command
and load, written between markers into ``docs/performance.md`` (a GPU run into a block of its own).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

from bench.schedule import ONCE_A_LEVEL, SLOW_PEERS
from bench.targets import fmt, llamacpp_targets, ms, targets
from gerdsen_ai_server.runtime.blas import find_openblas
from tests.support import ROOT

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_BEGIN, GPU_END = "<!-- bench-gpu:begin -->", "<!-- bench-gpu:end -->"  # a run where MLX computes on a GPU


def say(text: str) -> None:
    print(text, flush=True)


def device_label(gpu: str) -> str:
    return f"GPU ({gpu})" if gpu else "CPU"


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

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("impetus", "mlx", "mlx-lm", "gunicorn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def report(
    args: argparse.Namespace,
    command: str,
    started: str,
    loads: list[tuple[str, tuple[float, ...]]],
    raw: dict[str, dict[str, Any]],
    servers: dict[str, dict[str, Any]],
    ours_info: dict[str, Any],
    elapsed: float,
    model_desc: str,
    raw_llama: dict[str, Any] | None = None,
    steal: float | None = None,
) -> str:
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
        + (
            "Servers: started, measured and stopped one at a time."
            if args.sequential
            else "Servers: all started first; then each concurrency level ran on each server in turn, one server "
            "driven at a time, so the shared machine's changing load falls on all alike."
        ),
        "",
        "Load average (1/5/15 min) during the run: "
        + "; ".join(f"{what} {a:.2f}/{b:.2f}/{c:.2f}" for what, (a, b, c) in loads)
        + "."
        + (
            ""
            if steal is None
            else f" CPU time the hypervisor gave to other machines (steal, /proc/stat) during "
            f"the run: {steal:.1%} of this machine's."
        ),
        "",
    ]
    if raw:
        sizes = args.batch_sizes
        lines += [
            "### Raw in-process mlx-lm (the limits)",
            "",
            "| configuration | one stream decode tok/s (median) | one stream end to end | "
            "one stream via batch_generate | "
            + " | ".join(f"batch_generate {n}: tok/s (decode only)" for n in sizes)
            + " |",
            "|---|---|---|---|" + "---|" * len(sizes),
        ]
        for r in raw.values():
            cells = []
            for n in sizes:
                b = next((x for x in r["batch"] if x["n"] == n), None)
                cells.append(f"{fmt(b['e2e_tps'])} ({fmt(b['decode_tps'])})" if b else "n/a")
            sb = r.get("single_batchgen") or {}
            lines.append(
                f"| {r['label']} | {fmt(r['single']['decode_tps'])} | {fmt(r['single']['e2e_tps'])} | "
                f"{fmt(sb.get('decode_tps', float('nan')))} | " + " | ".join(cells) + " |"
            )
        lines += [
            "",
            "One stream: `stream_generate`'s decode rate (prompt excluded), its tokens over wall time, and "
            "the decode rate of the same prompt alone through `batch_generate` (BatchGenerator, which both "
            "servers use). batch_generate N: all output tokens over the call's wall time (prefill included, "
            "like a server's aggregate); in brackets mlx-lm's own decode-only rate. "
            + (
                f"fp32 figures are the best of {args.raw_repeats} passes (start and end of the run)."
                if args.raw_repeats > 1
                else "One pass, at the start of the run."
            ),
            "",
        ]
    lines += [
        "### Servers, same streaming client",
        "",
        "| server | streams | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | per-stream decode tok/s | ok | "
        "server CPU cores | client CPU cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in servers.values():
        for lv in s["levels"]:
            lines.append(
                f"| {s['label']} | {lv.streams} | {fmt(lv.aggregate_tps)} | {ms(lv.ttft(0.5))} | "
                f"{ms(lv.ttft(0.99))} | {fmt(lv.stream_decode_tps)} | {len(lv.ok)}/{len(lv.results)} | "
                f"{fmt(lv.server_cores, 2)} | {fmt(lv.client_cores, 2)} |"
            )
    lines += [
        "",
        "Aggregate: all output tokens over the level's wall time. Per-stream decode: the median stream's "
        "tokens after the first over its time after the first. CPU cores: CPU seconds over the level's wall "
        "time, of the server's processes and of this benchmark client (which shares the machine)."
        + (
            f" The 1- and 8-stream levels ran {args.level_repeats} rounds (each on every server in turn, new "
            "prompts each round); each server's faster round is shown."
            if args.level_repeats > 1
            else ""
        )
        + (
            " mlx_lm.server on the bf16 checkpoint (4-5x slower here, half a minute and more a level) ran each "
            "level once, and with OpenBLAS (which bf16 never reaches) only at 8 streams."
            if not args.gpu and any(k in servers for k in SLOW_PEERS)
            else ""
        )
        + (
            " Our server on glibc's malloc (for information) ran each level once."
            if args.level_repeats > 1 and any(k in servers for k in ONCE_A_LEVEL)
            else ""
        ),
        "",
    ]
    lines += paired_table(raw, servers)
    chats = [(s["label"], s["chat"]) for s in servers.values() if s.get("chat")]
    if chats:
        lines += [
            "### Multi-turn chat: cold vs warm time to first token",
            "",
            "| server | prompt tokens cold → warm | cold TTFT ms | warm TTFT ms (history + 1 turn) | "
            "cold / warm | prefix-cache hits |",
            "|---|---|---|---|---|---|",
        ]
        for label, c in chats:
            hits = "n/a" if c.get("hits") is None else f"{c['hits']} of {2 * c['reps']} requests"
            lines.append(
                f"| {label} | {c['history_tokens']} → {c['warm_prompt_tokens']} | {ms(c['cold'])} | "
                f"{ms(c['warm'])} | {c['cold'] / c['warm']:.1f}x | {hits} |"
            )
        lines += [
            "",
            f"Median of {chats[0][1]['reps']} pair(s) for ours (one for each mlx_lm.server), each on its "
            "own history; 16 output tokens.",
            "",
        ]
    lines += ["### Targets (issue 3)", "", *targets(raw, servers, ours_info, args.gpu), ""]
    if "ours llama.cpp" in servers:
        lines += [
            "### Targets (issue 12: the llama.cpp backend, same weights as an f32 GGUF)",
            "",
            *llamacpp_targets(raw_llama or {}, servers),
            "",
        ]
    prof = (servers.get("ours") or {}).get("profile")
    if prof:
        total = max(1, prof["engine_samples"])
        lines += [
            "### Where the time goes while 8 streams decode (py-spy + per-thread CPU)",
            "",
            f"A separate 8-stream pass ({fmt(prof['tps'])} tok/s while profiled), {prof['duration']} s window. "
            "CPU cores used by the worker's threads (psutil, by py-spy's thread names):",
            "",
            "| threads | CPU cores |",
            "|---|---|",
        ]
        lines += [f"| {g} | {c:.2f} |" for g, c in prof["cpu"]]
        lines += [
            "",
            f"The engine thread's wall time ({prof['engine_samples']} py-spy samples at 200 Hz, idle included):",
            "",
            "| engine thread | share |",
            "|---|---|",
        ]
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
    rows = [
        "### The limits, round by round",
        "",
        "| level | round | raw limit tok/s | ours tok/s | ours / raw |",
        "|---|---|---|---|---|",
    ]
    for n, what in ((1, "one stream: decode rate"), (8, "8 streams: batch_generate-8 vs aggregate")):
        for i, (lim, level) in enumerate(zip(pair["rounds"].get(n, []), ours["rounds"].get(n, []), strict=False)):
            limit = lim["decode_tps"] if n == 1 else lim["e2e_tps"]
            value = level.stream_decode_tps if n == 1 else level.aggregate_tps
            rows.append(f"| {what} | {i + 1} | {fmt(limit)} | {fmt(value)} | {value / limit:.0%} |")
    return rows + [
        "",
        "The raw limits come from one resident in-process mlx-lm (`bench.raw --serve`, the "
        "configuration our server computes in), measured just before the servers in each round of "
        "the level. The targets take the median of the rounds' ratios: each pair is measured seconds "
        "apart, so the machine's drift over the run (10-20 % here) cancels; each side's best round is "
        "shown there for information.",
        "",
    ]


def write_doc(
    path: Path, body: str, gpu: str = "", markers: tuple[str, str] | None = None, title: str | None = None
) -> None:
    """Rewrite the run's block in ``path``: the CPU run's block, or (``gpu``) the GPU run's, each its own markers;
    another run's (``markers``, e.g. bench/overhead.py's proxy) goes under ``title`` when the file lacks it."""
    begin, end = markers or ((GPU_BEGIN, GPU_END) if gpu else (BEGIN, END))
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(head + block + tail)
        return
    if text:  # a file without this block: add it as a section of its own
        title = title or ("## Latest GPU run" if gpu else "## Latest run")
        path.write_text(text.rstrip("\n") + f"\n\n{title}\n\n{block}\n")
        return
    intro = (
        "# Performance\n\n"
        "Figures from `make bench` (`python -m bench.run`, also `impetus bench`): our server, "
        "`python -m mlx_lm.server` and raw in-process mlx-lm on one random-weight bench model "
        "(`bench/model.py`), in one run on one machine (one server driven at a time, the concurrency levels "
        "interleaved across servers), all driven by one streaming client (`bench/client.py`). The section between the markers is rewritten by each run; absolute "
        "numbers depend on the machine and its load, ratios from one run hold better.\n\n"
        + (f"{title}\n\n" if title else "## Latest GPU run\n\n" if gpu else "## Latest run\n\n")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(intro + block + "\n")
