"""The one streaming client every server in the benchmark is driven with.

OpenAI streaming over plain HTTP (``requests``, one thread per stream): ``/v1/completions`` for
throughput, ``/v1/chat/completions`` for the multi-turn chat. Every request is greedy
(``temperature: 0``) with a fixed ``max_tokens`` and asks for ``usage`` in the last chunk
(``stream_options.include_usage``); when a server sends no usage, tokens are counted from chunks.

Time to first token (TTFT) is from sending the request to the first chunk carrying text. Like the
OpenAI SDK, a stream is read to its end after ``[DONE]``, so each stream keeps one connection.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests


@dataclass
class Result:
    ok: bool
    ttft: float = float("nan")  # seconds
    total: float = float("nan")  # seconds, request sent -> stream ended
    tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    error: str = ""

    @property
    def decode_tps(self) -> float:
        """This stream's own decode rate: tokens after the first over the time after the first."""
        if self.tokens < 2 or not self.total > self.ttft:
            return float("nan")
        return (self.tokens - 1) / (self.total - self.ttft)


def sse_lines(response: requests.Response) -> Iterator[bytes]:
    """The response's lines. A chunked body (ours, under Gunicorn) is read a chunk as it arrives
    (``iter_content(None)``) and split here: ``iter_lines()`` reads 512-byte pieces through more layers,
    and at 16 streams on 2 cores the client's CPU a token took cores the server needed (bench/overhead.py
    reports the client's share). A body without chunks (``mlx_lm.server``: HTTP/1.0, read to the close)
    goes through ``iter_lines()`` as before: ``iter_content(None)`` would read it whole before its first line."""
    if not getattr(response.raw, "chunked", False):
        yield from response.iter_lines()
        return
    pending = b""
    for data in response.iter_content(chunk_size=None):
        chunk = pending + data
        lines = chunk.splitlines()  # \n, \r\n (a \r\n split across reads adds an empty line)
        pending = lines.pop() if lines and not chunk.endswith((b"\n", b"\r")) else b""
        yield from lines
    if pending:
        yield pending


def stream_request(session: requests.Session, url: str, body: dict[str, Any], timeout: float = 600) -> Result:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    chat = "messages" in body
    start = time.perf_counter()
    first = None
    chunks = 0
    usage: dict[str, Any] | None = None
    parts: list[str] = []
    done = False
    try:
        with session.post(url, json=body, stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                return Result(ok=False, error=f"HTTP {r.status_code}: {r.text[:200]}")
            for line in sse_lines(r):
                # Read on after [DONE] to the body's end: left unread, the connection is closed
                # and the stream's next request opens a new one.
                if done or not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(ok=False, error=str(chunk["error"])[:200])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        if first is None:
                            first = time.perf_counter() - start
                        chunks += 1
                        parts.append(text)
    except requests.RequestException as exc:
        return Result(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
    total = time.perf_counter() - start
    if first is None:
        return Result(ok=False, total=total, error="no text in the stream")
    return Result(
        ok=True,
        ttft=first,
        total=total,
        text="".join(parts),
        tokens=int(usage["completion_tokens"]) if usage else chunks,
        prompt_tokens=int(usage.get("prompt_tokens", 0)) if usage else 0,
    )


@dataclass
class LevelResult:
    streams: int
    wall: float
    results: list[Result] = field(default_factory=list)
    client_cores: float = float("nan")  # CPU this client process used over the level, in cores
    server_cores: float = float("nan")  # CPU the server's processes used, in cores (set by the caller)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if not r.ok]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.ok], q)

    @property
    def stream_decode_tps(self) -> float:
        """Median of each stream's own decode rate (TTFT excluded)."""
        rates = [r.decode_tps for r in self.ok if r.decode_tps == r.decode_tps]
        return statistics.median(rates) if rates else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..1); NaN for no values."""
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def run_level(
    base_url: str, model: str, prompts: list[str], streams: int, max_tokens: int, timeout: float = 600
) -> LevelResult:
    """``streams`` closed-loop clients share ``prompts`` (each sends its next as soon as one ends)."""
    url = base_url.rstrip("/") + "/v1/completions"
    lock = threading.Lock()
    todo = list(enumerate(prompts))
    results: list[Result | None] = [None] * len(prompts)

    ready = threading.Barrier(streams + 1)

    def worker() -> None:
        with requests.Session() as session:
            ready.wait()
            while True:
                with lock:
                    if not todo:
                        return
                    index, prompt = todo.pop(0)
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
                results[index] = stream_request(session, url, body, timeout)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    ready.wait()  # the clock starts when every client is up, not as each thread starts (~2 ms apart)
    cpu0 = time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return LevelResult(
        streams=streams,
        wall=wall,
        results=[r for r in results if r is not None],
        client_cores=(time.process_time() - cpu0) / wall,
    )


def chat(base_url: str, model: str, messages: list[dict[str, str]], max_tokens: int, timeout: float = 600) -> Result:
    with requests.Session() as session:
        return stream_request(
            session,
            base_url.rstrip("/") + "/v1/chat/completions",
            {"model": model, "messages": messages, "max_tokens": max_tokens},
            timeout,
        )
