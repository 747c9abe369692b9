"""KV cache quantization (IMPETUS_KV_BITS 0 / 8 / 4) on llama.cpp or MLX: bytes, memory, agreement, speed.

    python -m bench.kv_quant                      # the default model's GGUF, 8 slots x its 8,192 tokens
    python -m bench.kv_quant --context 2048 --max-tokens 64
    python -m bench.kv_quant --threads 1 --throughput 1900 7900   # and 8 streams of ~2k and ~8k tokens
    python -m bench.kv_quant --backend mlx --throughput 1900      # MLX: the batched quantized cache

One real server (``impetus serve``, IMPETUS_BACKEND=llamacpp) per setting, one at a time, on the
default model's GGUF. For each: the KV bytes per token (the registry's estimate, which is what
llama.cpp allocates: its own log line says the same MiB), the resident's ``memory_bytes``, the
worker's RSS once loaded, and greedy answers to a few prompts (one ~1,500 tokens long) with the
log-probability of each chosen token. Against the f16 cache: how many answers are identical, the
mean number of leading tokens that agree, and the mean absolute log-probability difference of the
chosen tokens where the answers still agree. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.prompts import sentence
from gerdsen_ai_server.engine.backends.llamacpp_sizing import kv_bytes
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID, default_gguf_path
from tests.support.server import start_server, stop_server


def prompts() -> list[str]:
    """Short questions and one long passage to summarise (~1,500 tokens: where a coarse cache shows)."""
    rng = random.Random("kv-quant")
    passage = " ".join(sentence(rng, 18) for _ in range(60))
    return [
        "What is the capital of France? Answer in one sentence.",
        "Write a short poem about the sea.",
        "Explain what a hash table is, in three sentences.",
        "List five fruits and one fact about each.",
        "Give me a recipe for pancakes.",
        f"Read this text and summarise it in two sentences.\n\n{passage}",
    ]


def throughput(
    server: Any, tokens: int, streams: int = 8, max_tokens: int = 32, model: str = DEFAULT_MODEL_ID
) -> dict[str, Any]:
    """``streams`` concurrent completions of ~``tokens``-token prompts (no shared prefix): prefill +
    decode of the whole wave, as aggregate tok/s and wall seconds."""
    words = int(tokens / 1.12)
    texts = [
        f"Document {i}. " + " ".join(sentence(random.Random(f"tp-{tokens}-{i}"), 18) for _ in range(words // 18))
        for i in range(streams)
    ]
    results: list[dict[str, Any]] = []

    def one(text: str) -> None:
        r = requests.post(
            server.base_url + "/completions",
            json={"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0},
            timeout=1800,
        )
        r.raise_for_status()
        results.append(r.json()["usage"])

    threads = [threading.Thread(target=one, args=(t,)) for t in texts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    completion = sum(u["completion_tokens"] for u in results)
    prompt = sum(u["prompt_tokens"] for u in results)
    return {
        "prompt_tokens_each": prompt // max(1, len(results)),
        "wall_s": round(wall, 2),
        "tok_s_generated": round(completion / wall, 1),
        "tok_s_all": round((prompt + completion) / wall, 1),
    }


def greedy_answers(server: Any, model: str, max_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers to ``prompts()``, with each chosen token's log-probability."""
    answers = []
    for text in prompts():
        r = requests.post(
            server.base_url + "/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": max_tokens,
                "logprobs": True,
            },
            timeout=600,
        )
        r.raise_for_status()
        body = r.json()
        content = body["choices"][0]["logprobs"]["content"]
        answers.append(
            {
                "prompt_tokens": body["usage"]["prompt_tokens"],
                "tokens": [c["token"] for c in content],
                "logprobs": [c["logprob"] for c in content],
            }
        )
    return answers


def worker_rss(pid: int) -> int:
    """The largest RSS among the server's processes: Gunicorn's worker, which holds the model."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return max(p.memory_info().rss for p in procs)


def run(bits: int, context: int, max_tokens: int, threads: int, waves: list[int]) -> dict[str, Any]:
    env = {
        "IMPETUS_BACKEND": "llamacpp",
        "IMPETUS_KV_BITS": str(bits),
        "IMPETUS_MAX_BATCH": "8",
        "IMPETUS_LLAMACPP_THREADS": str(threads),
        "IMPETUS_CONTEXT_LENGTH": str(context),
    }
    server = start_server(Path(tempfile.mkdtemp(prefix=f"kv{bits}-")), **env)
    try:
        models = requests.get(server.url + "/api/models", timeout=30).json()["data"]
        resident = next(m for m in models if m["state"] == "resident")
        rss = worker_rss(server.process.pid)
        answers = greedy_answers(server, DEFAULT_MODEL_ID, max_tokens)
        waves_out = {str(n): throughput(server, n) for n in waves}
        return {
            "throughput_8_streams": waves_out,
            "kv_bits": resident["load_options"]["kv_bits"],
            "memory_bytes": resident["memory_bytes"],
            "rss_bytes": rss,
            "answers": answers,
        }
    finally:
        stop_server(server)


MLX_ALIASES = {0: DEFAULT_MODEL_ID, 8: "kv8", 4: "kv4"}


def metric(server: Any, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def stored_bytes_per_token(server: Any, model: str) -> float:
    """What the prompt cache is charged per token it stores of one answer (prompt + answer but its
    last token): the KV cache's own bytes per token, measured (engine/quantized_cache.py)."""
    before = metric(server, "impetus_prompt_cache_bytes")
    r = requests.post(
        server.base_url + "/completions",
        json={"model": model, "prompt": f"Once upon a time ({model})", "max_tokens": 4, "temperature": 0},
        timeout=120,
    )
    r.raise_for_status()
    usage = r.json()["usage"]
    deadline = time.monotonic() + 30
    while (grown := metric(server, "impetus_prompt_cache_bytes") - before) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return grown / (usage["prompt_tokens"] + usage["completion_tokens"] - 1)


def run_mlx(max_tokens: int, waves: list[int]) -> dict[str, Any]:
    """One MLX server (IMPETUS_BACKEND=mlx, IMPETUS_MAX_BATCH=8) with the default model resident
    unquantized and again as ``kv8`` and ``kv4`` (``kv_bits`` 8, 4: the batched quantized cache, so
    continuous batching stays on): bytes per token, greedy agreement, 8-stream waves, in one run."""
    server = start_server(
        Path(tempfile.mkdtemp(prefix="kv-mlx-")), IMPETUS_BACKEND="mlx", IMPETUS_MAX_BATCH="8", IMPETUS_KEEP_ALIVE="-1"
    )
    try:
        for bits in (8, 4):
            body = {"model": DEFAULT_MODEL_ID, "alias": MLX_ALIASES[bits], "backend": "mlx", "kv_bits": bits}
            requests.post(server.url + "/api/models/load", json=body, timeout=600).raise_for_status()
        per_token = {bits: stored_bytes_per_token(server, alias) for bits, alias in MLX_ALIASES.items()}
        answers = {bits: greedy_answers(server, alias, max_tokens) for bits, alias in MLX_ALIASES.items()}
        out: dict[str, Any] = {"backend": "mlx", "model": DEFAULT_MODEL_ID, "streams": 8}
        for bits in MLX_ALIASES:
            row: dict[str, Any] = {
                "kv_bytes_per_token": per_token[bits],
                "kv_ratio": round(per_token[bits] / per_token[0], 4),
                "prompt_tokens": [a["prompt_tokens"] for a in answers[bits]],
            }
            if bits:
                row["agreement_with_unquantized"] = agreement(answers[0], answers[bits])
            out[f"kv{bits}"] = row
        for n in waves:  # the three one after another per wave, so each sees the same machine load
            for bits, alias in MLX_ALIASES.items():
                out[f"kv{bits}"].setdefault("throughput_8_streams", {})[str(n)] = throughput(server, n, model=alias)
        return out
    finally:
        stop_server(server)


def agreement(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Identical answers, mean agreeing prefix, mean |logprob difference| of the chosen tokens while they agree."""
    prefixes, diffs = [], []
    for a, b in zip(base, other, strict=True):
        n = 0
        while n < min(len(a["tokens"]), len(b["tokens"])) and a["tokens"][n] == b["tokens"][n]:
            diffs.append(abs(a["logprobs"][n] - b["logprobs"][n]))
            n += 1
        prefixes.append(n)
    return {
        "identical": sum(a["tokens"] == b["tokens"] for a, b in zip(base, other, strict=True)),
        "of": len(base),
        "agreeing_prefix_tokens": prefixes,
        "answer_tokens": [len(a["tokens"]) for a in base],
        "mean_abs_logprob_diff": round(sum(diffs) / max(1, len(diffs)), 5),
        "max_abs_logprob_diff": round(max(diffs, default=0.0), 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["llamacpp", "mlx"], default="llamacpp")
    parser.add_argument("--context", type=int, default=8192, help="tokens per slot (8 slots)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all cores)")
    parser.add_argument(
        "--throughput", type=int, nargs="*", default=[], help="prompt tokens of 8-stream waves, e.g. 1900 7900"
    )
    args = parser.parse_args(argv)
    if args.backend == "mlx":
        print(json.dumps(run_mlx(args.max_tokens, args.throughput), indent=1))
        return 0
    meta = read_gguf_header(default_gguf_path()).metadata
    runs = {bits: run(bits, args.context, args.max_tokens, args.threads, args.throughput) for bits in (0, 8, 4)}
    base = runs[0]
    out: dict[str, Any] = {"model": default_gguf_path().name, "slots": 8, "context": args.context}
    for bits, r in runs.items():
        out[f"kv{bits}"] = {
            "kv_bits_in_force": r["kv_bits"],
            "kv_bytes_per_token": kv_bytes(meta, 1, bits),
            "kv_bytes": kv_bytes(meta, 8 * args.context, bits),
            "kv_ratio": round(kv_bytes(meta, 1, bits) / kv_bytes(meta, 1, 0), 4),
            "memory_bytes": r["memory_bytes"],
            "rss_bytes": r["rss_bytes"],
            "rss_saved_bytes": base["rss_bytes"] - r["rss_bytes"],
            "kv_saved_bytes": kv_bytes(meta, 8 * args.context, 0) - kv_bytes(meta, 8 * args.context, bits),
            "prompt_tokens": [a["prompt_tokens"] for a in r["answers"]],
            "throughput_8_streams": r["throughput_8_streams"],
        }
        if bits:
            out[f"kv{bits}"]["agreement_with_f16"] = agreement(base["answers"], r["answers"])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
