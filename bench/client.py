"""The one streaming client every server in the benchmark is driven with.

OpenAI streaming over plain HTTP (``Session``: one keep-alive connection and thread per stream): ``/v1/completions`` for
throughput, ``/v1/chat/completions`` for the multi-turn chat. Every request is greedy
(``temperature: 0``) with a fixed ``max_tokens`` and asks for ``usage`` in the last chunk
(``stream_options.include_usage``); when a server sends no usage, tokens are counted from chunks.

Time to first token (TTFT) is from sending the request to the first chunk carrying text. Like the
OpenAI SDK, a stream is read to its end after ``[DONE]``, so each stream keeps one connection.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


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


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it."""


class Session:
    """One keep-alive HTTP/1.1 connection to one server, as ``requests.Session`` keeps one per stream, read
    with as little Python a token as this client can: the benchmark's client shares the machine's cores with
    the server it measures (bench/overhead.py reports its CPU a token), and requests/urllib3 took ~35 µs of
    CPU a token at 16 streams on 2 cores, where raw mlx-lm, which has no client, took ~210 in all. A read
    takes whatever has arrived (several tokens' chunks when the client fell behind) and splits it at once.

    Bodies: chunked (ours under Gunicorn, llama-cpp-python's uvicorn), ``Content-Length``, or to the close
    (``mlx_lm.server``: HTTP/1.0). A kept connection the server closed meanwhile is opened again, once."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._where: tuple[str, int] | None = None
        self._buf = b""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, b""

    def post(self, url: str, body: dict[str, Any], timeout: float) -> tuple[int, Iterator[bytes]]:
        """POST ``body`` as JSON: the status and the body's lines as they arrive (read them to the end
        to keep the connection)."""
        parts = urlsplit(url)
        where = (parts.hostname or "127.0.0.1", parts.port or 80)
        payload = json.dumps(body).encode()
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {where[0]}:{where[1]}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        for attempt in (0, 1):
            reused = self._sock is not None and self._where == where
            if not reused:
                self.close()
                self._sock, self._where = socket.create_connection(where, timeout=timeout), where
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert self._sock is not None
            self._sock.settimeout(timeout)
            try:
                self._sock.sendall(head + payload)
                status, headers = self._head()
            except (ConnectionError, ProtocolError):
                self.close()
                if reused and attempt == 0:  # the server closed a kept connection: open a new one
                    continue
                raise
            return status, self._lines(headers)
        raise ProtocolError("unreachable")

    def _recv(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        return data

    def _head(self) -> tuple[int, dict[bytes, bytes]]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            self._buf += self._recv()
        lines = self._buf[:end].split(b"\r\n")
        self._buf = self._buf[end + 4 :]
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if version == b"HTTP/1.0" and headers.get(b"connection") != b"keep-alive":
            headers[b"connection"] = b"close"
        return int(rest[:3]), headers

    def _body(self, headers: dict[bytes, bytes]) -> Iterator[bytes]:
        """The body's bytes as they arrive, de-chunked."""
        if headers.get(b"transfer-encoding") == b"chunked":
            yield from self._chunks()
        elif b"content-length" in headers:
            left = int(headers[b"content-length"])
            while left > 0:
                if not self._buf:
                    self._buf = self._recv()
                piece, self._buf = self._buf[:left], self._buf[left:]
                left -= len(piece)
                yield piece
        else:  # to the close
            headers[b"connection"] = b"close"
            if self._buf:
                yield self._buf
            self._buf = b""
            while data := self._sock.recv(1 << 16) if self._sock else b"":
                yield data

    def _chunks(self) -> Iterator[bytes]:
        buf, pos = self._buf, 0
        while True:
            out: list[bytes] = []
            while True:  # every whole chunk in the buffer
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";")[0], 16)
                if size == 0:  # the last chunk (no trailers expected): the body ends at its empty line
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        break
                    if out:
                        yield b"".join(out)
                    self._buf = buf[end + 4 :]
                    return
                if len(buf) < eol + 2 + size + 2:
                    break
                out.append(buf[eol + 2 : eol + 2 + size])
                pos = eol + 2 + size + 2
            if out:
                yield b"".join(out)
            buf, pos = buf[pos:] + self._recv(), 0

    def _lines(self, headers: dict[bytes, bytes]) -> Iterator[bytes]:
        pending = b""
        for data in self._body(headers):
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                yield line[:-1] if line.endswith(b"\r") else line
        if pending:
            yield pending
        if headers.get(b"connection") == b"close":
            self.close()


def stream_request(session: Session, url: str, body: dict[str, Any], timeout: float = 600) -> Result:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    chat = "messages" in body
    start = time.perf_counter()
    first = None
    chunks = 0
    usage: dict[str, Any] | None = None
    parts: list[str] = []
    done = False
    try:
        status, lines = session.post(url, body, timeout)
        if status != 200:
            answer = b"\n".join(lines).decode(errors="replace")
            return Result(ok=False, error=f"HTTP {status}: {answer[:200]}")
        for line in lines:
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
                session.close()  # the rest of this body is not read
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
    except (OSError, ValueError, ProtocolError) as exc:
        session.close()
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
        with Session() as session:
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
    with Session() as session:
        return stream_request(
            session,
            base_url.rstrip("/") + "/v1/chat/completions",
            {"model": model, "messages": messages, "max_tokens": max_tokens},
            timeout,
        )
