"""Speculative decoding on an "edit this text" workload: plain vs ngram (and draft_model), 1 and 8 streams.

    LD_PRELOAD=$(ls /usr/lib/*/openblas-pthread/libopenblas.so.0) .venv/bin/python -m bench.speculative
    ... -m bench.speculative --rounds 1 --max-tokens 96      # shorter
    ... -m bench.speculative --draft smollm2-135m-instruct  # and draft_model, drafting with that model
    ... -m bench.speculative --num-tokens 3,6               # ngram with 3 and with 6 drafted tokens
    ... -m bench.speculative --kv-bits 8                    # on the 8-bit KV cache (IMPETUS_KV_BITS)

One real server (``impetus serve``, IMPETUS_BACKEND=mlx) on the embedded default model. Each prompt
asks the model to repeat a paragraph with its spelling fixed, so the answer copies its input: what
prompt lookup drafts from. Greedy requests, streamed (bench/client.py), each prompt once to warm up
(its prefix is then cached for every mode alike). Single stream: every prompt plain, then with
``speculative_config: {"method": "ngram"}`` (then ``draft_model`` with ``--draft``), order reversed
every other round; decode tok/s is a stream's tokens after the first over the time after the first
(the median over requests). N streams (8): the prompts, cycled, sent together, one wave a mode a
round in the same alternating order (aggregate tok/s, the median over rounds); every sequence of the
batch drafts and is verified in the same pass (engine/speculative.py). Acceptance is the /metrics
counters' accepted / drafted, tokens a step the tokens over the engine's steps, rows a pass the
sequences that drafted per verification pass. Prints one table, with whether each mode's greedy
answers were the plain ones. No model smaller than the default one is at hand offline: ``--draft``
with the default model itself shows the mechanism (every draft accepted), not a gain (its draft
steps cost what the target's do).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench.client import Result, Session, stream_request
from tests.support import DEFAULT_MODEL
from tests.support.server import Server, start_server, stop_server

PARAGRAPHS = [
    "The quick brown fox jumps over the lazzy dog. It was a sunny day in the park, and the children were playing "
    "footbal near the old oak tree while their parents watched from the benchs. A man sold ice cream from a small "
    "cart, and the line in front of it grew longer every minut.",
    "Our team will meet on Tuesday to discus the new budget. Please bring the reports from last quarter, "
    "including the sales figures and the list of open isues. We will also talk about the hiring plan for next "
    "year and the office move, which is planed for the spring.",
    "To make the bread, mix the flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes "
    "until it is smoth, then leave it to rise for an hour. Shape the loaf, let it rise again, and bake it in a "
    "hot oven untill the crust is golden brown.",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 3, "prompt_lookup_min": 2}


def body(paragraph: str, max_tokens: int, config: dict[str, Any] | None) -> dict[str, Any]:
    message = f"Repeat this text exactly, fixing the spelling mistakes:\n\n{paragraph}"
    request: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
    }
    if config is not None:
        request["speculative_config"] = config
    return request


def counters(server: Server) -> tuple[int, int, int, int, int]:
    """(drafted, accepted, engine steps, verification passes, rows that drafted) from /metrics."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text

    def value(name: str) -> int:
        found = re.search(rf"^{name}_total (\d+)", text, re.M)
        return int(found.group(1)) if found else 0

    return (
        value("impetus_speculative_drafted_tokens"),
        value("impetus_speculative_accepted_tokens"),
        value("impetus_engine_steps"),
        value("impetus_speculative_passes"),
        value("impetus_speculative_rows"),
    )


def wave(server: Server, bodies: list[dict[str, Any]]) -> tuple[list[Result], float]:
    """The requests sent together; their results and the wall time of the wave."""
    url = f"{server.base_url}/chat/completions"
    results: list[Result | None] = [None] * len(bodies)

    def one(i: int) -> None:
        with Session() as session:
            results[i] = stream_request(session, url, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    failed = [r.error for r in done if not r.ok]
    if failed or len(done) != len(bodies):
        raise SystemExit(f"requests failed: {failed}")
    return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="single-stream rounds over the prompts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--draft", default="", help="also a draft_model mode, drafting with this model id")
    parser.add_argument(
        "--num-tokens", default="6", help="ngram's num_speculative_tokens; several (3,6): one ngram mode each"
    )
    parser.add_argument("--kv-bits", type=int, default=0, help="IMPETUS_KV_BITS: 8 or 4, a quantized KV cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"IMPETUS_KV_BITS": str(args.kv_bits)} if args.kv_bits else {}
        server = start_server(Path(tmp), IMPETUS_BACKEND="mlx", IMPETUS_SPECULATIVE="off", **env)
        try:
            run(server, args)
        finally:
            stop_server(server)


class Tally:
    """One mode's counters and answers, summed over its waves."""

    def __init__(self) -> None:
        self.moved = [0, 0, 0, 0, 0]  # drafted, accepted, steps, passes, rows (counters' order)
        self.tokens = 0
        self.rates: list[float] = []
        self.answers: dict[int, str] = {}

    def add(self, server: Server, bodies: list[dict[str, Any]], key: int) -> list[Result]:
        before = counters(server)
        results, wall = wave(server, bodies)
        after = counters(server)
        self.moved = [m + a - b for m, a, b in zip(self.moved, after, before, strict=True)]
        self.tokens += sum(r.tokens for r in results)
        self.rates.append(results[0].decode_tps if len(results) == 1 else self.tokens_of(results) / wall)
        for i, result in enumerate(results):
            self.answers[key + i] = result.text
        return results

    @staticmethod
    def tokens_of(results: list[Result]) -> int:
        return sum(r.tokens for r in results)

    def columns(self) -> str:
        drafted, accepted, steps, passes, rows = self.moved
        acceptance = f"{accepted / drafted:.0%} of {drafted}" if drafted else "-"
        return f"{self.tokens / max(steps, 1):6.2f} {acceptance:>14} {rows / passes if passes else 0:5.2f}"


def run(server: Server, args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.num_tokens.split(",")]
    modes: dict[str, dict[str, Any] | None] = {"plain": None}
    for n in counts:
        modes["ngram" if len(counts) == 1 else f"ngram K={n}"] = {**NGRAM, "num_speculative_tokens": n}
    if args.draft:
        modes["draft_model"] = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": 4}
    wave(server, [body(p, args.max_tokens, None) for p in PARAGRAPHS])  # warm-up: prefixes cached for all
    one = {mode: Tally() for mode in modes}
    many = {mode: Tally() for mode in modes}
    for round_ in range(args.rounds):
        order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
        for i, paragraph in enumerate(PARAGRAPHS):
            for mode in order:
                one[mode].add(server, [body(paragraph, args.max_tokens, modes[mode])], i)
        for mode in order:
            bodies = [body(PARAGRAPHS[i % len(PARAGRAPHS)], args.max_tokens, modes[mode]) for i in range(args.streams)]
            many[mode].add(server, bodies, 0)
    load = os.getloadavg()
    print(
        f"\nSpeculative decoding, {DEFAULT_MODEL} on MLX, 'edit this text' x {len(PARAGRAPHS)}, greedy, "
        f"max_tokens {args.max_tokens}, kv_bits {args.kv_bits}, {args.rounds} round(s); ratios against plain; load "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    n = args.streams
    print(
        f"{'mode':12} {'1-stream tok/s':>15} {'ratio':>7} {'tok/st':>6} {'accepted':>14} {'rows':>5}"
        f" {f'{n}-stream tok/s':>15} {'ratio':>7} {'tok/st':>6} {'accepted':>14} {'rows':>5}"
    )
    base, base_many = statistics.median(one["plain"].rates), statistics.median(many["plain"].rates)
    for mode in modes:
        rate, rate_many = statistics.median(one[mode].rates), statistics.median(many[mode].rates)
        same = sum(one[mode].answers[i] == one["plain"].answers[i] for i in one["plain"].answers)
        same_many = sum(many[mode].answers[i] == many["plain"].answers[i] for i in many["plain"].answers)
        print(
            f"{mode:12} {rate:15.1f} {rate / base:6.2f}x {one[mode].columns()}"
            f" {rate_many:15.1f} {rate_many / base_many:6.2f}x {many[mode].columns()}"
            f"   (greedy answers as plain: {same} of {len(PARAGRAPHS)}, {same_many} of {n} at {n})"
        )
    print("tok/st: tokens a step (engine steps); rows: sequences that drafted, per verification pass")


if __name__ == "__main__":
    main()
