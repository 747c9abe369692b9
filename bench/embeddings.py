"""Embedding-model figures: a MiniLM-L6-shaped BERT (384 wide, 6 layers, 12 heads; random weights,
tiny vocabulary) in process, then through the real server, alone and beside a streaming chat.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 .venv/bin/python -m bench.embeddings

Prints the encoder's tokens/s (one input per call and batched), a request's time alone, and the
longest gap between a chat stream's tokens while that request runs (the engine computes embeddings
in slices between decoding rounds, engine/embeddings.py's EmbeddingJob; streams step between them).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from openai import OpenAI

from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.server import start_server, stop_server
from tests.support.tiny_models import build_tiny_bert

TEXT = "the cat sat on the mat " * 21  # 128 tokens with [CLS] and [SEP]


def in_process(folder: Path, inputs: int) -> None:
    from gerdsen_ai_server.engine.formats.encoder import load_encoder

    model, tokenizer, _ = load_encoder(folder, "float32")
    ids = [tokenizer.encode(TEXT)] * inputs
    model.embed(ids[:4])  # warm-up
    for per_call in (1, 32):
        began = time.perf_counter()
        for start in range(0, inputs, per_call):
            model.embed(ids[start : start + per_call])
        took = time.perf_counter() - began
        print(f"in process, {per_call:>2} x {len(ids[0])} tokens a call: {inputs * len(ids[0]) / took:,.0f} tokens/s")


def through_server(root: Path, inputs: int) -> None:
    (root / DEFAULT_MODEL).symlink_to(TEST_MODELS_DIR / DEFAULT_MODEL)
    server = start_server(root, IMPETUS_MODELS_DIR=str(root))
    try:
        client = OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=900)
        client.embeddings.create(model="minilm", input=TEXT)  # loads it
        began = time.perf_counter()
        reply = client.embeddings.create(model="minilm", input=[TEXT] * inputs)
        alone = time.perf_counter() - began
        print(
            f"server, {inputs} x {reply.usage.prompt_tokens // inputs} tokens in one request: {alone:.2f} s "
            f"({reply.usage.prompt_tokens / alone:,.0f} tokens/s)"
        )
        gaps: list[float] = []

        def chat() -> None:
            last = time.perf_counter()
            for _ in client.chat.completions.create(
                model=DEFAULT_MODEL,
                max_tokens=300,
                temperature=0,
                stream=True,
                messages=[{"role": "user", "content": "Tell me a long story."}],
            ):
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        streaming = threading.Thread(target=chat)
        streaming.start()
        time.sleep(1.0)
        began = time.perf_counter()
        client.embeddings.create(model="minilm", input=[TEXT] * inputs)
        beside = time.perf_counter() - began
        streaming.join()
        steady = sorted(gaps[2:])
        print(
            f"server, the same request beside a streaming chat: {beside:.2f} s; the stream's longest gap "
            f"{steady[-1]:.2f} s, median {steady[len(steady) // 2] * 1000:.0f} ms"
        )
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64, help="inputs of 128 tokens per request")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="impetus-embed-bench-"))
    build_tiny_bert(root / "minilm", hidden=384, layers=6, heads=12, max_positions=512, pooling="mean")
    in_process(root / "minilm", args.inputs)
    through_server(root, args.inputs)


if __name__ == "__main__":
    main()
