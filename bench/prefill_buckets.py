"""Prefill buckets on and off, side by side in one process: time to first token and tok/s (issue 28, item 3).

    python -m bench.prefill_buckets                    # the tiny proxy model on this machine, 3 paired rounds
    python -m bench.prefill_buckets --model-dir build/bench-model --rounds 3 --max-tokens 256

Our engine in-process (no HTTP: what differs between the two is only the engine's prefill), on the bench
model, prompt cache off so every request prefills. Every request's prompt has a length no request before it
had (a fresh shape, as every user prompt is): with buckets off MLX's GPU builds meet a new prefill shape each
time, with buckets on (``IMPETUS_PREFILL_BUCKET``, engine/prefill_buckets.py) one of a few padded lengths.
Each round runs both settings (in alternating order) at each concurrency, so a shared machine's drifting
load falls on both alike; the table shows the median of the rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _lengths(start: int, spread: int) -> list[int]:
    """Every length of [start, start + spread) once, in a fixed shuffled order (short and long alternate)."""
    lengths = list(range(start, start + spread))
    random.Random(0).shuffle(lengths)
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_buckets", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: build/bench-model-tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,8", help="concurrency levels (default 1,8)")
    parser.add_argument("--requests", type=int, default=4, help="requests each stream sends a level (default 4)")
    parser.add_argument("--lengths", default="24-1023", help="prompt lengths, each used once (default 24-1023)")
    parser.add_argument("--bucket", type=int, default=64, help="the bucket compared with 0 (default 64)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench import model as bench_model
    from gerdsen_ai_server.engine.engine import InferenceEngine
    from gerdsen_ai_server.engine.options import EngineOptions
    from gerdsen_ai_server.engine.prefill_buckets import prompt_batch
    from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams

    folder = args.model_dir or bench_model.build(bench_model.default_out(bench_model.TINY), bench_model.TINY)
    streams = [int(s) for s in args.streams.split(",")]
    engine = InferenceEngine(
        EngineOptions(folder.parent, max_batch=max(16, *streams), max_queue=64, prompt_cache_bytes=0, backend="mlx")
    )
    engine.start()
    engine.load_model(str(folder), trusted=True).result(timeout=600)
    (resident,) = engine.residents()
    model_id = resident.loaded.model_id
    batch = prompt_batch(resident.backend._generator)  # type: ignore[attr-defined]  # noqa: SLF001
    vocab = len(resident.loaded.tokenizer)
    low, high = (int(x) for x in args.lengths.split("-"))
    lengths = iter(_lengths(low, high + 1 - low) * 100)  # past the range: lengths come again
    serial = iter(range(1 << 30))
    lock = threading.Lock()

    def one(ttfts: list[float]) -> int:
        with lock:
            n, k = next(lengths), next(serial)
        prompt = [(k * 7919 + i * 104729) % (vocab - 300) + 256 for i in range(n)]  # distinct, no shared prefix
        started = time.perf_counter()
        stream = engine.submit(GenerationRequest(model_id, prompt, args.max_tokens, SamplingParams(temperature=0)))
        count = 0
        for event in stream:
            if event.token_ids and not count:
                ttfts.append(time.perf_counter() - started)
            count += len(event.token_ids)
            assert event.error is None, event.error
        return count

    def level(n: int) -> tuple[float, float]:
        ttfts: list[float] = []
        totals = [0] * n

        def run(i: int) -> None:
            totals[i] = sum(one(ttfts) for _ in range(args.requests))

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return statistics.median(ttfts) * 1000, sum(totals) / (time.perf_counter() - started)

    one([])  # warm-up: load, first compile of the decode path
    results: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        order = (0, args.bucket) if r % 2 == 0 else (args.bucket, 0)
        for n in streams:
            for bucket in order:
                batch.bucket = bucket
                results.setdefault((n, bucket), []).append(level(n))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    engine.shutdown()

    lines = [
        f"| streams | TTFT p50 ms, bucket 0 | TTFT p50 ms, bucket {args.bucket} | tok/s, bucket 0 "
        f"| tok/s, bucket {args.bucket} | on / off tok/s (rounds' range) |",
        "|---|---|---|---|---|---|",
    ]
    for n in streams:
        off, on = results[(n, 0)], results[(n, args.bucket)]
        ratios = sorted(b[1] / a[1] for a, b in zip(off, on, strict=True))
        ratio = statistics.median(ratios)
        lines.append(
            f"| {n} | {statistics.median(x[0] for x in off):.1f} | {statistics.median(x[0] for x in on):.1f} "
            f"| {statistics.median(x[1] for x in off):.1f} | {statistics.median(x[1] for x in on):.1f} | {ratio:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
        )
    note = (
        f"Model {folder.name}, {args.max_tokens} tokens a request, {args.requests} requests a stream, "
        f"median of {args.rounds} paired round(s); every prompt a new length ({args.lengths} tokens)."
    )
    text = "\n".join([*lines, "", note])
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
