"""Speculative decoding on an "edit this text" workload: plain vs ngram (and draft_model), 1 and 8 streams.

    LD_PRELOAD=$(ls /usr/lib/*/openblas-pthread/libopenblas.so.0) .venv/bin/python -m bench.speculative
    ... -m bench.speculative --rounds 1 --max-tokens 96      # shorter
    ... -m bench.speculative --draft smollm2-135m-instruct  # and draft_model, drafting with that model

One real server (``impetus serve``, IMPETUS_BACKEND=mlx) on the embedded default model. Each prompt
asks the model to repeat a paragraph with its spelling fixed, so the answer copies its input: what
prompt lookup drafts from. Greedy requests, streamed (bench/client.py), each prompt once to warm up
(its prefix is then cached for every mode alike). Single stream: every prompt plain, then with
``speculative_config: {"method": "ngram"}`` (then ``draft_model`` with ``--draft``), order reversed
every other round; decode tok/s is a stream's
tokens after the first over the time after the first (the median over requests), acceptance the
/metrics counters' accepted / drafted. 8 streams: the prompts, cycled, sent together in each mode
(aggregate tok/s); speculation runs only while a sequence decodes alone in its batch (engine/speculative.py).
Prints one table, with whether each mode's greedy answers were the plain ones. No model smaller than
the default one is at hand offline: ``--draft`` with the default model itself shows the mechanism
(every draft accepted), not a gain (its draft steps cost what the target's do).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench.client import Result, stream_request
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


def counters(server: Server) -> tuple[int, int, int]:
    """(drafted, accepted, engine steps) from /metrics."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text

    def value(name: str) -> int:
        found = re.search(rf"^{name}_total (\d+)", text, re.M)
        return int(found.group(1)) if found else 0

    return (
        value("impetus_speculative_drafted_tokens"),
        value("impetus_speculative_accepted_tokens"),
        value("impetus_engine_steps"),
    )


def wave(server: Server, bodies: list[dict[str, Any]]) -> tuple[list[Result], float]:
    """The requests sent together; their results and the wall time of the wave."""
    url = f"{server.base_url}/chat/completions"
    results: list[Result | None] = [None] * len(bodies)

    def one(i: int) -> None:
        with requests.Session() as session:
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), IMPETUS_BACKEND="mlx", IMPETUS_SPECULATIVE="off")
        try:
            run(server, args)
        finally:
            stop_server(server)


def run(server: Server, args: argparse.Namespace) -> None:
    modes: dict[str, dict[str, Any] | None] = {"plain": None, "ngram": NGRAM}
    if args.draft:
        modes["draft_model"] = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": 4}
    wave(server, [body(p, args.max_tokens, None) for p in PARAGRAPHS])  # warm-up: prefixes cached for all
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    answers: dict[str, dict[int, str]] = {mode: {} for mode in modes}
    moved: dict[str, list[int]] = {mode: [0, 0, 0, 0] for mode in modes}  # drafted, accepted, steps, tokens
    for round_ in range(args.rounds):
        for i, paragraph in enumerate(PARAGRAPHS):
            for mode in list(modes) if round_ % 2 == 0 else list(reversed(modes)):
                before = counters(server)
                (result,), _ = wave(server, [body(paragraph, args.max_tokens, modes[mode])])
                after = counters(server)
                for k in range(3):
                    moved[mode][k] += after[k] - before[k]
                moved[mode][3] += result.tokens
                rates[mode].append(result.decode_tps)
                answers[mode][i] = result.text
    many: dict[str, float] = {}
    many_drafted: dict[str, tuple[int, int]] = {}
    for mode, config in modes.items():
        bodies = [body(PARAGRAPHS[i % len(PARAGRAPHS)], args.max_tokens, config) for i in range(args.streams)]
        before = counters(server)
        results, wall = wave(server, bodies)
        after = counters(server)
        many[mode] = sum(r.tokens for r in results) / wall
        many_drafted[mode] = (after[0] - before[0], after[1] - before[1])
    print(
        f"\nSpeculative decoding, {DEFAULT_MODEL} on MLX, 'edit this text' x {len(PARAGRAPHS)}, greedy, "
        f"max_tokens {args.max_tokens}, {args.rounds} round(s); ratios against plain"
    )
    print(
        f"{'mode':12} {'1-stream tok/s':>15} {'ratio':>7} {'tokens/step':>12} {'accepted':>16} "
        f"{f'{args.streams}-stream tok/s':>15} {'ratio':>7} {'drafted':>8}"
    )
    base, base_many = statistics.median(rates["plain"]), many["plain"]
    for mode in modes:
        drafted, accepted, steps, tokens = moved[mode]
        rate = statistics.median(rates[mode])
        acceptance = f"{accepted / drafted:.0%} of {drafted}" if drafted else "-"
        same = sum(answers[mode][i] == answers["plain"][i] for i in answers["plain"])
        print(
            f"{mode:12} {rate:15.1f} {rate / base:6.2f}x {tokens / max(steps, 1):12.2f} {acceptance:>16} "
            f"{many[mode]:15.1f} {many[mode] / base_many:6.2f}x {many_drafted[mode][0]:8d}"
            f"   (greedy answers as plain: {same} of {len(PARAGRAPHS)})"
        )


if __name__ == "__main__":
    main()
