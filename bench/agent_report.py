"""The agent bench's section of docs/performance.md: per-turn TTFT and RSS, the totals, the restart, the goals."""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from bench import client
from bench.report import machine, versions

BEGIN, END = "<!-- bench-agent:begin -->", "<!-- bench-agent:end -->"
TITLE = "## Agent workload"
MIB = 2**20


def markers(shape: str) -> tuple[str, str]:
    """The block of a run: the bench model's (``bench``) or a named shape's, each between markers of its own."""
    if shape == "bench":
        return BEGIN, END
    return f"<!-- bench-agent-{shape}:begin -->", f"<!-- bench-agent-{shape}:end -->"


def model_line(spec: Any, shape: str) -> str:
    name = "the bench model" if shape == "bench" else f"the bench model at {shape}'s shape (`--shape {shape}`)"
    return (
        f"{name} (random llama, hidden {spec.hidden}, {spec.layers} layers, {spec.heads} heads, {spec.kv_heads} KV "
        f"heads, intermediate {spec.intermediate}, vocab {spec.vocab})"
    )


def flop_floor(spec: Any, cached: float, new: float, fresh: float) -> float:
    """The FLOP of prefilling ``new`` tokens after ``cached`` ones over those of a fresh ``fresh``-token prompt:
    the least a later turn's TTFT can be over the fresh prompt's when compute is the bound, whatever the cache.

    A token costs 2 FLOP a weight of its projections and MLP, and 4 x hidden a key it attends to (scores and
    values over all heads; grouped KV heads do not reduce it). The output projection runs for one token only."""
    kv = spec.hidden * spec.kv_heads // spec.heads
    weights = 2 * spec.hidden * spec.hidden + 2 * spec.hidden * kv + 3 * spec.hidden * spec.intermediate

    def cost(c: float, n: float) -> float:
        return n * 2 * weights + 4 * spec.hidden * (c * n + n * (n + 1) / 2)

    return ratio(cost(cached, new), cost(0, fresh)) if new > 0 and fresh > 0 else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds == seconds else "n/a"


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and a == a and b == b else float("nan")


def times(x: float) -> str:
    return f"{x:.1f}x" if x == x else "n/a"


def later_ratio(run: dict[str, Any]) -> float:
    """The worst later turn's TTFT p50 over the fresh new-token prefill at the same concurrency: the one taken
    right after the turn where there is one (bench/agent.py ``paired``), else the one before the turns."""
    paired = run.get("paired", {})
    later = [
        ratio(client.percentile([r.ttft for r in turn if r.ok], 0.5), paired.get(i, run["ref"]["together"]))
        for i, turn in enumerate(run["turns"][1:], start=2)
    ]
    return max(later, default=float("nan"))


def paired_cell(run: dict[str, Any], turn: int, p50: float) -> str:
    """The fresh prompts' TTFT taken right after ``turn`` and the turn's p50 over it (bench/agent.py ``paired``)."""
    fresh = run.get("paired", {}).get(turn)
    return f"{ms(fresh)} ({times(ratio(p50, fresh))})" if fresh is not None else ""


def render(
    args: argparse.Namespace,
    command: str,
    started: str,
    elapsed: float,
    work: Any,
    results: dict[str, dict[str, Any]],
    restarted: dict[str, Any] | None,
) -> str:
    m, v = machine(), versions()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    new = args.turn_tokens + args.max_tokens
    dtype = next((r["info"].get("compute_dtype") for r in results.values() if r.get("info")), None) or "?"
    spec, shape = getattr(args, "spec", None), getattr(args, "shape", "bench")
    model = model_line(spec, shape) if spec else "the bench model"
    lines = [
        f"Run {started} on {m['platform']}, {m['cpu']}, {m['cores']} cores, {m['memory']}; mlx {v['mlx']}, "
        f"mlx-lm {v['mlx-lm']}, impetus {v['impetus']}. The cores were shared with other work during the run "
        f"(load average at its end {load}): absolute figures are noisy, the ratios within a server hold better.",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min). Model: {model} with its context bound raised to "
        f"{args.n_ctx} tokens; the peers in fp32 "
        "(mlx_lm.server: the fp32 copy with OpenBLAS; llama.cpp: the f32 GGUF). "
        f"Workload: {args.sessions} sessions share a {work.system_tokens}-token system prompt (a coding agent's "
        f"instructions and 9 OpenAI-style tool definitions); each runs {args.turns} turns, each adding "
        f"~{args.turn_tokens} tokens (the task, then tool results and user follow-ups in turn) to its history "
        f"with the previous answer, and generating {args.max_tokens} tokens (greedy; the bench model never "
        "ends early). The sessions start each turn together; TTFT p50/p99 are over them. Ours on MLX: compute "
        f"dtype {dtype}, `IMPETUS_MAX_BATCH=16`{''.join(f', `{e}`' for e in args.ours_env)}; prompt tokens as "
        "each server counted them (n/a: none in its stream).",
        "",
        "| server | turn | prompt tokens | TTFT p50 ms | TTFT p99 ms | p50 / fresh new-token prefill | tokens | "
        "peak RSS MiB | FLOP floor | fresh right after ms (p50 / it) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results.values():
        previous = float("nan")
        for i, turn in enumerate(run["turns"], start=1):
            ok = [r for r in turn if r.ok]
            p50 = client.percentile([r.ttft for r in ok], 0.5)
            counted = [r.prompt_tokens for r in ok if r.prompt_tokens]  # llama-cpp-python streams no usage
            prompt = f"{statistics.median(counted):.0f}" if counted else "n/a"
            rel = times(ratio(p50, run["ref"]["together"])) if i > 1 else "(cold)"
            tokens = statistics.median(counted) if counted else float("nan")
            fresh = run["ref"].get("prompt_tokens") or 0
            floor = flop_floor(spec, previous, tokens - previous, fresh) if spec and i > 1 else float("nan")
            previous = tokens
            lines.append(
                f"| {run['label']} | {i} | {prompt} | {ms(p50)} | "
                f"{ms(client.percentile([r.ttft for r in ok], 0.99))} | {rel} | "
                f"{sum(r.tokens for r in ok)}/{args.sessions * args.max_tokens} | "
                f"{run['rss_turns'].get(i, 0) / MIB:.0f} | {times(floor) if i > 1 else ''} | {paired_cell(run, i, p50)} |"
            )
    lines += [
        "",
        f"| server | total time s | fresh {new}-token prompt TTFT ms: alone / {args.sessions} at once | worst "
        f"later turn / fresh, paired where measured (goal ≤ 2x) | RSS after load MiB | peak RSS MiB | peak RSS turn 2 → {args.turns} | "
        "load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results.values():
        worst = later_ratio(run)
        verdict = "**met**" if worst <= 2 else "not met" if worst == worst else "n/a"
        rss = run["rss_turns"]
        lines.append(
            f"| {run['label']} | {run['wall']:.1f} | {ms(run['ref']['alone'])} / {ms(run['ref']['together'])} | "
            f"{times(worst)} {verdict} | {run['rss_loaded'] / MIB:.0f} | {run['rss_peak'] / MIB:.0f} | "
            f"{rss.get(2, 0) / MIB:.0f} → {rss.get(args.turns, 0) / MIB:.0f} | {run.get('load', float('nan')):.1f} |"
        )
    lines += [
        "",
        f"Fresh new-token prefill: prompts of ~{new} tokens (a later turn's new tokens: its message and the "
        f"previous answer) sharing no prefix with anything, sent alone (median of 3) and {args.sessions} at once "
        "(the workload's concurrency: the goal compares each later turn's p50 with this, since the turn's "
        f"{args.sessions} sessions prefill together). Total time: the {args.turns} turns. RSS: the server's "
        "process tree (Gunicorn's master and worker for ours), summed, sampled every 100 ms. Load: the machine's "
        "5-minute load average as that server's turns ended (other work shares the cores). FLOP floor: the "
        "FLOP of prefilling the turn's new tokens (its prompt tokens less the previous turn's) after the cached "
        "ones over those of the fresh prompt (its counted tokens): projections and MLP at 2 FLOP a weight, "
        "attention at 4 x hidden a cached key; the ratio a compute-bound server cannot beat whatever its cache. "
        f"Fresh right after: {args.sessions} fresh prompts of the same size sent at once right after the turn "
        "(not in the total time), so that the ratio beside it saw about the same load.",
    ]
    for run in results.values():
        cache = run.get("info", {}).get("cache") or {}
        shown = ", ".join(f"`{k}` {v:g}" for k, v in cache.items() if "tier_" in k or "hits" in k or "misses" in k)
        if shown:
            lines += [
                "",
                f"{run['label']}: prompt-cache counters after the turns (reference prompts included): {shown}.",
            ]
    if restarted is not None:
        cold, disk = restarted["cold"], restarted["disk"]
        speedup = ratio(cold.ttft, disk.ttft)
        tier = restarted["disk_tier"]
        verdict = ("**met**" if speedup >= 5 else "not met") if tier else "not met (no disk tier yet)"
        after, before = restarted["metrics_after"], restarted["metrics_before"]
        moved = ", ".join(f"`{k}` {before.get(k, 0):g} → {val:g}" for k, val in after.items() if val != before.get(k))
        lines += [
            "",
            "| our server, restarted on the same models folder | prompt tokens | TTFT ms |",
            "|---|---|---|",
            f"| cold: a system prompt of the same length, no shared prefix | {cold.prompt_tokens} | {ms(cold.ttft)} |",
            f"| session 0's first turn again | {disk.prompt_tokens} | {ms(disk.ttft)} |",
            f"| cold / first turn again (goal ≥ 5x) | | {times(speedup)} {verdict} |",
            "",
            (
                "The disk tier (`IMPETUS_PROMPT_CACHE_DISK_BYTES`, "
                f"{args.disk_bytes / 2**30:g} GiB) was set for the first run and the restart."
                if tier
                else "`IMPETUS_PROMPT_CACHE_DISK_BYTES` was set, but this checkout has no disk tier yet (the "
                "setting is ignored): both figures after the restart are cold prefills."
            )
            + (f" Prompt-cache counters over the two requests: {moved}." if moved else ""),
        ]
    errors = [r.error for run in results.values() for turn in run["turns"] for r in turn if not r.ok]
    errors += [e for run in results.values() for e in run["ref"]["errors"]]
    if errors:
        lines += ["", f"Errors ({len(errors)}): " + "; ".join(sorted(set(errors))[:5])]
    return "\n".join(lines)
