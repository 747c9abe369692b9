"""The issues' targets, met or not: our server against the raw limits and its peers (issue 3), and the
llama.cpp backend against raw llama.cpp and llama-cpp-python's server (issue 12); the table cells' formats.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from bench import client


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:.0f}"


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
    return [
        ratio_row(f"{what} ({where}): {which}", f"{listed} → {median:.0%}", "≥ 95 %", median >= 0.95),
        ratio_row(f"{what}: each side's best round", best_text, "(for information)", None),
    ]


def targets(
    raw: dict[str, dict[str, Any]], servers: dict[str, dict[str, Any]], ours_info: dict[str, Any], gpu: str = ""
) -> list[str]:
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
        rows += limit_rows(
            "one stream: ours / raw in-process decode",
            where,
            same_rounds.get(1),
            f"{fmt(one.stream_decode_tps)} / {fmt(single['decode_tps'])} = {best:.0%}",
            best,
        )
        r2 = one.aggregate_tps / single["e2e_tps"]
        rows.append(
            ratio_row(
                "one stream, end to end (TTFT included): ours / raw",
                f"{fmt(one.aggregate_tps)} / {fmt(single['e2e_tps'])} = {r2:.0%}",
                "(for information)",
                None,
            )
        )
    if eight and ceiling:
        best = eight.aggregate_tps / ceiling["e2e_tps"]
        rows += limit_rows(
            "8 streams: ours / batch_generate-8 ceiling",
            f"{where}, prefill included",
            same_rounds.get(8),
            f"{fmt(eight.aggregate_tps)} / {fmt(ceiling['e2e_tps'])} = {best:.0%}",
            best,
        )
        r3 = eight.aggregate_tps / ceiling["decode_tps"]
        rows.append(
            ratio_row(
                "8 streams: ours / batch_generate-8 decode-only rate",
                f"{fmt(eight.aggregate_tps)} / {fmt(ceiling['decode_tps'])} = {r3:.0%}",
                "(for information)",
                None,
            )
        )
    variant = servers.get("ours malloc")
    v8 = level_of(variant["levels"], 8) if variant else None
    if v8 and ceiling:
        r = v8.aggregate_tps / ceiling["e2e_tps"]
        rows.append(
            ratio_row(
                f"8 streams: {variant['label']} / batch_generate-8 ceiling (same run)",
                f"{fmt(v8.aggregate_tps)} / {fmt(ceiling['e2e_tps'])} = {r:.0%}",
                "(for information)",
                None,
            )
        )
    for key, label in (
        ("mlx", "mlx_lm.server as shipped"),
        ("mlx+openblas", "mlx_lm.server + OpenBLAS"),
        ("mlx+openblas fp32", "mlx_lm.server + OpenBLAS, fp32 copy"),
    ):
        other = servers.get(key)
        o8 = level_of(other["levels"], 8) if other else None
        if not (eight and o8):
            continue
        r = eight.aggregate_tps / o8.aggregate_tps
        rows.append(
            ratio_row(
                f"8 streams: ours / {label}, aggregate tok/s",
                f"{fmt(eight.aggregate_tps)} / {fmt(o8.aggregate_tps)} = {r:.2f}x",
                "≥ 1x",
                r >= 1,
            )
        )
        p50 = eight.ttft(0.5) / o8.ttft(0.5)
        rows.append(
            ratio_row(
                f"8 streams: p50 TTFT ours / {label}",
                f"{ms(eight.ttft(0.5))} / {ms(o8.ttft(0.5))} ms = {p50:.2f}x",
                "≤ 0.7x",
                p50 <= 0.7,
            )
        )
        p99 = eight.ttft(0.99) / o8.ttft(0.99)
        rows.append(
            ratio_row(
                f"8 streams: p99 TTFT ours / {label}",
                f"{ms(eight.ttft(0.99))} / {ms(o8.ttft(0.99))} ms = {p99:.2f}x",
                "≤ 1x",
                p99 <= 1,
            )
        )
        if key == "mlx" and sys.platform.startswith("linux") and not gpu:
            rows.append(
                ratio_row(
                    "Linux: 8 streams ours / mlx_lm.server as shipped (same bf16 checkpoint)",
                    f"{r:.2f}x",
                    "≥ 4x",
                    r >= 4,
                )
            )
    if gpu and one and eight:
        r = eight.aggregate_tps / one.aggregate_tps
        rows.append(
            ratio_row(
                f"GPU ({gpu}): 8 streams / one stream, our aggregate tok/s",
                f"{fmt(eight.aggregate_tps)} / {fmt(one.aggregate_tps)} = {r:.2f}x",
                "≥ 3x",
                r >= 3,
            )
        )
    chat = ours.get("chat") or {}
    if chat:
        r = chat["cold"] / chat["warm"]
        rows.append(
            ratio_row(
                f"multi-turn ({chat['history_tokens']}-token history): cold / warm TTFT",
                f"{ms(chat['cold'])} / {ms(chat['warm'])} ms = {r:.1f}x",
                "≥ 5x",
                r >= 5,
            )
        )
    return rows


def llamacpp_targets(raw_llama: dict[str, Any], servers: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    ours = servers["ours llama.cpp"]["levels"]
    one, eight = level_of(ours, 1), level_of(ours, 8)
    if one and raw_llama.get("single"):
        ref = raw_llama["single"]["decode_tps"]
        r = one.stream_decode_tps / ref
        rows.append(
            ratio_row(
                "one stream: ours (llama.cpp) / raw in-process llama.cpp decode",
                f"{fmt(one.stream_decode_tps)} / {fmt(ref)} = {r:.0%}",
                "≥ 95 %",
                r >= 0.95,
            )
        )
    if one and eight:
        r = eight.aggregate_tps / one.aggregate_tps
        rows.append(
            ratio_row(
                "8 streams / 1 stream, aggregate tok/s (ours, llama.cpp)",
                f"{fmt(eight.aggregate_tps)} / {fmt(one.aggregate_tps)} = {r:.2f}x",
                "≥ 2x",
                r >= 2,
            )
        )
    peer = servers.get("llama-cpp-python server")
    for lv in ours if peer else []:
        other = level_of(peer["levels"], lv.streams)
        if other and other.aggregate_tps > 0:
            r = lv.aggregate_tps / other.aggregate_tps
            rows.append(
                ratio_row(
                    f"{lv.streams} stream(s): ours (llama.cpp) / llama-cpp-python server",
                    f"{fmt(lv.aggregate_tps)} / {fmt(other.aggregate_tps)} = {r:.2f}x",
                    "≥ 1x",
                    r >= 1,
                )
            )
    mlx_ours = servers.get("ours")
    if mlx_ours and eight and (m8 := level_of(mlx_ours["levels"], 8)):
        rows.append(
            ratio_row(
                "8 streams: ours on llama.cpp / ours on MLX (same weights)",
                f"{fmt(eight.aggregate_tps)} / {fmt(m8.aggregate_tps)} = {eight.aggregate_tps / m8.aggregate_tps:.2f}x",
                "(for information)",
                None,
            )
        )
    return rows
