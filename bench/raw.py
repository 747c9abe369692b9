"""In-process mlx-lm decode: the limits a server is measured against.

    python -m bench.raw --model build/bench-model --dtype float32 --batches 4,8,16 --max-tokens 64

Run by ``bench.run`` in a subprocess, once as stored (bfloat16, the wheel's reference BLAS) and
once in float32 with OpenBLAS preloaded (``LD_PRELOAD``, which must be set before the process
starts; the dtype conversion is the one our server applies at load). Prints one JSON object:

- ``single``: one stream through ``mlx_lm.stream_generate`` (median of ``--single-reps`` runs): decode tok/s (mlx-lm's own
  ``generation_tps``, prompt excluded), time to first token, and tokens / wall time.
- ``single_batchgen``: the same prompt through ``batch_generate`` alone (BatchGenerator's own
  per-step cost, which both servers pay).
- ``batch``: ``mlx_lm.batch_generate`` on N prompts: total tokens / wall time (prefill included,
  like a server's aggregate) and mlx-lm's ``generation_tps`` (prefill excluded).

Each also gives the CPU it took a token, in microseconds: ``cpu_main_us`` (the calling thread: mlx-lm's
Python and the MLX calls it makes) and ``cpu_native_us`` (every other thread: MLX's CPU stream, OpenBLAS's
workers), so that a server's CPU a token can be set beside the reference's (bench/overhead.py).

With ``--serve`` it loads the model once, prints ``{"ready": ...}`` and then answers one JSON line
per request line on stdin, idle in between: ``{"op": "single"}`` (the ``single`` figures above) or
``{"op": "batch", "n": 8, "seed": 3}`` (one ``batch`` row, on prompts of that seed). ``bench.run``
keeps one such process beside the servers and measures the limits in the same rounds as the
servers' levels, so that a ratio compares figures taken minutes, not the whole run, apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def cpu_now() -> tuple[float, float]:
    """CPU seconds so far: this thread's, and the whole process's."""
    return time.thread_time(), time.process_time()


def cpu_per_token(before: tuple[float, float], tokens: int) -> dict[str, float]:
    """The CPU microseconds a token since ``before``: the calling thread's and every other thread's."""
    main, total = (now - then for now, then in zip(cpu_now(), before, strict=True))
    tokens = max(1, tokens)
    return {"cpu_main_us": main / tokens * 1e6, "cpu_native_us": (total - main) / tokens * 1e6}


def one_stream(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int, reps: int) -> dict[str, Any]:
    """One stream through ``stream_generate``, the median of ``reps`` runs by decode rate."""
    from mlx_lm import stream_generate

    singles = []
    for _ in range(reps):  # one stream is a short window: median of a few runs
        cpu0, start = cpu_now(), time.perf_counter()
        first = None
        response = None
        for item in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            response = item
            if first is None:
                first = time.perf_counter() - start
        wall = time.perf_counter() - start
        assert response is not None
        singles.append(
            {
                "tokens": response.generation_tokens,
                "decode_tps": response.generation_tps,
                "ttft_s": first,
                "e2e_tps": response.generation_tokens / wall,
                **cpu_per_token(cpu0, response.generation_tokens),
            }
        )
    singles.sort(key=lambda r: r["decode_tps"])
    return singles[len(singles) // 2]


def batch(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """``batch_generate`` on ``prompts``: all output tokens over the call's wall time, and mlx-lm's own rates."""
    from mlx_lm import batch_generate

    cpu0, start = cpu_now(), time.perf_counter()
    res = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    wall = time.perf_counter() - start
    tokens = sum(len(t) for t in res.token_ids)
    cpu = cpu_per_token(cpu0, tokens)
    return {
        "n": len(prompts),
        "tokens": tokens,
        "e2e_tps": tokens / wall,
        "decode_tps": res.stats.generation_tps,
        "prompt_tps": res.stats.prompt_tps,
        **cpu,
    }


def serve(model: Any, tokenizer: Any, args: argparse.Namespace, info: dict[str, Any]) -> int:
    from bench.prompts import completion_prompts

    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req["op"] == "single":
            prompt = tokenizer.encode(completion_prompts(1, args.prompt_words, seed=1)[0])
            out = one_stream(model, tokenizer, prompt, args.max_tokens, args.single_reps)
        else:
            texts = completion_prompts(int(req["n"]), args.prompt_words, seed=int(req.get("seed", 1)))
            out = batch(model, tokenizer, [tokenizer.encode(p) for p in texts], args.max_tokens)
        print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="", help="float32, bfloat16, ... (default: as stored)")
    parser.add_argument("--batches", default="4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--single-reps", type=int, default=3, help="one-stream runs; the median is reported")
    parser.add_argument("--serve", action="store_true", help="answer requests on stdin (see the docstring)")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="decode with our server's compiled one-token step (engine/compiled.py; a CPU float32 llama only)",
    )
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_lm

    from bench.prompts import completion_prompts
    from gerdsen_ai_server.runtime.blas import blas_in_use

    model, tokenizer = mlx_lm.load(args.model)
    if args.dtype:
        model.set_dtype(getattr(mx, args.dtype))
        mx.eval(model.parameters())
    compiled = False
    if args.compiled:  # the forward pass our server runs, so that a comparison is of host overhead only
        from gerdsen_ai_server.engine.compiled import compile_decode

        compiled = compile_decode(model)
    dtype = str(model.model.embed_tokens.weight.dtype).replace("mlx.core.", "")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    prompts = [tokenizer.encode(p) for p in completion_prompts(max(batches + [1]), args.prompt_words, seed=1)]

    # Warm-up: first calls allocate buffers and build kernels.
    one_stream(model, tokenizer, prompts[0], 4, 1)
    batch(model, tokenizer, prompts[:2], 4)

    result: dict[str, object] = {
        "dtype": dtype,
        "blas": blas_in_use(),
        "max_tokens": args.max_tokens,
        "compiled": compiled,
    }
    if args.serve:
        return serve(model, tokenizer, args, result)
    result["single"] = one_stream(model, tokenizer, prompts[0], args.max_tokens, args.single_reps)
    # The same single stream through BatchGenerator (what both servers decode with).
    alone = batch(model, tokenizer, prompts[:1], args.max_tokens)
    result["single_batchgen"] = {
        "tokens": alone["tokens"],
        "decode_tps": alone["decode_tps"],
        "e2e_tps": alone["e2e_tps"],
    }
    result["batch"] = [batch(model, tokenizer, prompts[:n], args.max_tokens) for n in batches]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
