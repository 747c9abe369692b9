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
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="", help="float32, bfloat16, ... (default: as stored)")
    parser.add_argument("--batches", default="4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--single-reps", type=int, default=3, help="one-stream runs; the median is reported")
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_lm
    from mlx_lm import batch_generate, stream_generate

    from bench.prompts import completion_prompts
    from gerdsen_ai_server.blas import blas_in_use

    model, tokenizer = mlx_lm.load(args.model)
    if args.dtype:
        model.set_dtype(getattr(mx, args.dtype))
        mx.eval(model.parameters())
    dtype = str(model.model.embed_tokens.weight.dtype).replace("mlx.core.", "")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    prompts = [tokenizer.encode(p) for p in completion_prompts(max(batches + [1]), args.prompt_words, seed=1)]

    # Warm-up: first calls allocate buffers and build kernels.
    for _ in stream_generate(model, tokenizer, prompts[0], max_tokens=4):
        pass
    batch_generate(model, tokenizer, prompts[:2], max_tokens=4)

    result: dict[str, object] = {"dtype": dtype, "blas": blas_in_use(), "max_tokens": args.max_tokens}
    singles = []
    for _ in range(args.single_reps):  # one stream is a short window: median of a few runs
        start = time.perf_counter()
        first = None
        response = None
        for item in stream_generate(model, tokenizer, prompts[0], max_tokens=args.max_tokens):
            response = item
            if first is None:
                first = time.perf_counter() - start
        wall = time.perf_counter() - start
        assert response is not None
        singles.append({"tokens": response.generation_tokens, "decode_tps": response.generation_tps,
                        "ttft_s": first, "e2e_tps": response.generation_tokens / wall})
    singles.sort(key=lambda r: r["decode_tps"])
    result["single"] = singles[len(singles) // 2]
    # The same single stream through BatchGenerator (what both servers decode with).
    start = time.perf_counter()
    res = batch_generate(model, tokenizer, prompts[:1], max_tokens=args.max_tokens, return_token_ids=True)
    wall = time.perf_counter() - start
    result["single_batchgen"] = {"tokens": len(res.token_ids[0]), "decode_tps": res.stats.generation_tps,
                                 "e2e_tps": len(res.token_ids[0]) / wall}
    out = []
    for n in batches:
        start = time.perf_counter()
        res = batch_generate(model, tokenizer, prompts[:n], max_tokens=args.max_tokens, return_token_ids=True)
        wall = time.perf_counter() - start
        tokens = sum(len(t) for t in res.token_ids)
        out.append({"n": n, "tokens": tokens, "e2e_tps": tokens / wall, "decode_tps": res.stats.generation_tps,
                    "prompt_tps": res.stats.prompt_tps})
    result["batch"] = out
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
