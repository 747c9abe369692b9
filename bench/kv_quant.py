"""KV cache quantization (IMPETUS_KV_BITS 0 / 8 / 4) on llama.cpp or MLX: bytes, memory, agreement, speed.

    python -m bench.kv_quant                      # the default model's GGUF, 8 slots x its 8,192 tokens
    python -m bench.kv_quant --context 2048 --max-tokens 64
    python -m bench.kv_quant --threads 1 --throughput 1900 7900   # and 8 streams of ~2k and ~8k tokens
    python -m bench.kv_quant --backend mlx --throughput 1900      # MLX: the batched quantized cache
    python -m bench.kv_quant --backend mlx --long 2048 --max-tokens 32  # 8 streams over 2,048-token contexts

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


def long_context(
    server: Any, tokens: int, streams: int = 8, max_tokens: int = 32, model: str = DEFAULT_MODEL_ID
) -> dict[str, Any]:
    """``streams`` streams decoding over ~``tokens``-token contexts. One document of ~``tokens``
    tokens is prefilled once (``cold_ttft_s``: one prompt's prefill), then ``streams`` concurrent
    streamed requests of the document + a question of their own find it in the prefix cache and
    decode ``max_tokens`` each in one batch. That measures what the issue asks (decode tok/s with
    8 long contexts live, quantized or not) without prefilling 8 x ``tokens`` tokens, which on a
    shared 2-core CPU takes longer than the bench can wait (docs/performance.md says the arithmetic).
    ``decode_tok_s``: tokens after each stream's first / the seconds from the first stream's first
    token to the last stream's end; ``kv_bytes``: the wave's live KV at its end (measured bytes a
    token, ``stored_bytes_per_token``, times the tokens the streams hold)."""
    sentences = round(tokens / 1.06 / 18)  # SmolLM2: ~1.06 tokens a word of bench.prompts (1,913 from 100)
    document = "Document. " + " ".join(sentence(random.Random(f"long-{tokens}"), 18) for _ in range(sentences))

    def post(prompt: str, n: int, out: list[dict[str, Any]]) -> None:
        start, first, usage = time.perf_counter(), None, {}
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        with requests.post(server.base_url + "/completions", json=body, stream=True, timeout=3600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
        out.append({"start": start, "first": first or time.perf_counter(), "end": time.perf_counter(), **usage})

    cold: list[dict[str, Any]] = []
    post(document, 1, cold)
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=post, args=(f"{document}\n\nQuestion {i}: what is this about?", max_tokens, results))
        for i in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttfts = sorted(r["first"] - r["start"] for r in results)
    decoded = sum(r["completion_tokens"] - 1 for r in results)
    held = sum(r["prompt_tokens"] + r["completion_tokens"] for r in results)
    window = max(r["end"] for r in results) - min(r["first"] for r in results)
    return {
        "context_tokens_each": results[0]["prompt_tokens"],
        "cold_ttft_s": round(cold[0]["first"] - cold[0]["start"], 2),
        "ttft_s_p50": round(ttfts[len(ttfts) // 2], 2),
        "ttft_s_max": round(ttfts[-1], 2),
        "decode_tok_s": round(decoded / window, 2),
        "completion_tokens": sum(r["completion_tokens"] for r in results),
        "kv_bytes": int(held * BYTES_PER_TOKEN.get(model, 0)),
        "wall_s": round(max(r["end"] for r in results) - min(r["start"] for r in results), 2),
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
BYTES_PER_TOKEN: dict[str, float] = {}  # model -> its measured KV bytes a token (stored_bytes_per_token)


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
    per_token = grown / (usage["prompt_tokens"] + usage["completion_tokens"] - 1)
    BYTES_PER_TOKEN[model] = per_token
    return per_token


def run_mlx(max_tokens: int, waves: list[int], long: list[int] | None = None) -> dict[str, Any]:
    """One MLX server (IMPETUS_BACKEND=mlx, IMPETUS_MAX_BATCH=8) with the default model resident
    unquantized and again as ``kv8`` and ``kv4`` (``kv_bits`` 8, 4: the batched quantized cache, so
    continuous batching stays on): bytes per token, greedy agreement, 8-stream waves, in one run."""
    server = start_server(  # a prompt cache that holds one 8,000-token float32 document (370 MB) for --long
        Path(tempfile.mkdtemp(prefix="kv-mlx-")),
        IMPETUS_BACKEND="mlx",
        IMPETUS_MAX_BATCH="8",
        IMPETUS_KEEP_ALIVE="-1",
        IMPETUS_PROMPT_CACHE_BYTES=str(2 << 30),
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
        for n in long or []:  # likewise: the three side by side per context length
            for bits, alias in MLX_ALIASES.items():
                wave = long_context(server, n, max_tokens=max_tokens, model=alias)
                out[f"kv{bits}"].setdefault("long_context_8_streams", {})[str(n)] = wave
                print(json.dumps({f"kv{bits}": {n: wave}}), flush=True)  # progress: each row as it comes
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
    parser.add_argument(
        "--long",
        type=int,
        nargs="*",
        default=[],
        help="MLX: contexts of 8 decoding streams sharing a prefix, e.g. 2048",
    )
    args = parser.parse_args(argv)
    if args.backend == "mlx":
        print(json.dumps(run_mlx(args.max_tokens, args.throughput, args.long), indent=1))
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
