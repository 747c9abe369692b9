"""In-process llama.cpp decode of one stream: the limit our llama.cpp backend is measured against.

    python -m bench.raw_llamacpp --model build/bench-model-f32.gguf --max-tokens 64

llama-cpp-python's ``Llama`` on the GGUF (one sequence, the same threads as our server's
backend): the prompt is evaluated, then ``--max-tokens`` greedy tokens are decoded one
``eval`` at a time. Prints one JSON object: ``single`` with decode tok/s (prompt excluded),
time to first token and tokens / wall time, the median of ``--single-reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--single-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import numpy as np
    from llama_cpp import Llama

    from bench.prompts import completion_prompts

    llm = Llama(
        model_path=args.model,
        n_ctx=4096,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
        logits_all=False,
    )
    prompt = llm.tokenize(completion_prompts(1, args.prompt_words, seed=1)[0].encode(), add_bos=False)

    def run(max_tokens: int) -> dict[str, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter() - start
        t1 = time.perf_counter()
        for _ in range(max_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        end = time.perf_counter()
        return {
            "tokens": max_tokens,
            "decode_tps": (max_tokens - 1) / (end - t1),
            "ttft_s": first,
            "e2e_tps": max_tokens / (end - start),
        }

    run(4)  # warm-up
    singles = sorted((run(args.max_tokens) for _ in range(args.single_reps)), key=lambda r: r["decode_tps"])
    print(json.dumps({"threads": args.threads, "max_tokens": args.max_tokens, "single": singles[len(singles) // 2]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
