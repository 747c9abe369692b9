"""Vision figures (issue 30): images per second and time to first token with one 512x512 image per
request, at 1 and 4 concurrent streams, on the tiny random Qwen2-VL the tests build
(tests/support/tiny_vlm.py): our server (engine/backends/vision.py) against mlx-vlm in this process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 .venv/bin/python -m bench.vision

mlx-vlm in process: ``stream_generate`` one request after the other (1 stream), and its
``batch_generate`` of 4 prompts at once (4 streams: its batched path; its TTFT is the whole batch's
time to its first token, which batch_generate does not report, so it shows as "-"). Ours: streaming
chat requests with the image as a data: URL through the OpenAI SDK; 4 streams are 4 client threads.
Prints one table (Markdown), with the date and the machine's load average before and after the run.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from openai import OpenAI

from tests.support import DEFAULT_MODEL
from tests.support.models import default_model_folder
from tests.support.server import start_server, stop_server
from tests.support.tiny_vlm import build_tiny_qwen2_vl

VLM = "tiny-qwen2-vl"
QUESTION = "What is in this picture?"


def make_image(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(512, 512, 3) * 255).astype("uint8")).save(out, format="PNG")
    return out.getvalue()


def mlx_vlm_in_process(folder: Path, image: Path, requests_n: int, max_tokens: int) -> list[tuple[int, float, float]]:
    """(streams, images/s, median TTFT s) rows for mlx-vlm itself."""
    import mlx_vlm

    model, processor = mlx_vlm.load(str(folder))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    mlx_vlm.generate(model, processor, prompt, image=[str(image)], max_tokens=2, verbose=False)  # warm-up
    ttfts = []
    began = time.perf_counter()
    for _ in range(requests_n):
        start = time.perf_counter()
        for n, _ in enumerate(
            mlx_vlm.stream_generate(model, processor, prompt, image=[str(image)], max_tokens=max_tokens, temperature=0)
        ):
            if n == 0:
                ttfts.append(time.perf_counter() - start)
    single = (1, requests_n / (time.perf_counter() - began), statistics.median(ttfts))
    rounds = max(1, requests_n // 4)
    began = time.perf_counter()
    for _ in range(rounds):
        # greedy (its default); it applies the chat template itself (mlx-vlm's prompt_utils), so it takes the question
        mlx_vlm.batch_generate(model, processor, images=[str(image)] * 4, prompts=[QUESTION] * 4, max_tokens=max_tokens)
    return [single, (4, rounds * 4 / (time.perf_counter() - began), float("nan"))]


def ours(base_url: str, image: bytes, requests_n: int, max_tokens: int, streams: int) -> tuple[int, float, float]:
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages: Any = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]
    ttfts: list[float] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            first = None
            stream = client.chat.completions.create(
                model=VLM, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
            )
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
            with lock:
                ttfts.append(first if first is not None else time.perf_counter() - start)

    worker(1)  # warm-up
    ttfts.clear()
    per = max(1, requests_n // streams)
    threads = [threading.Thread(target=worker, args=(per,)) for _ in range(streams)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams, per * streams / (time.perf_counter() - began), statistics.median(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        models = Path(tmp) / "models"
        build_tiny_qwen2_vl(models / VLM, default_model_folder())
        (models / DEFAULT_MODEL).symlink_to(default_model_folder(), target_is_directory=True)
        image = make_image(0)
        (Path(tmp) / "image.png").write_bytes(image)
        rows: list[tuple[str, int, float, float]] = []
        server = start_server(Path(tmp), IMPETUS_MODELS_DIR=str(models))
        try:
            reply = requests.post(server.url + "/api/models/load", json={"model": VLM}, timeout=300)
            reply.raise_for_status()
            for streams in (1, 4):
                rows.append(
                    ("impetus (server)", *ours(server.base_url, image, args.requests, args.max_tokens, streams))
                )
        finally:
            stop_server(server)
        for row in mlx_vlm_in_process(models / VLM, Path(tmp) / "image.png", args.requests, args.max_tokens):
            rows.append(("mlx-vlm (in process)", *row))
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, os.getloadavg()))
    print(f"\n{started}, load average {before} before and {after} after")
    print(f"one 512x512 PNG per request, {args.max_tokens} tokens each, {args.requests} requests per row\n")
    print("| runner | streams | images/s | median TTFT (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, streams, rate, ttft in rows:
        shown = "-" if ttft != ttft else f"{ttft * 1000:.0f}"
        print(f"| {name} | {streams} | {rate:.2f} | {shown} |")


if __name__ == "__main__":
    main()
