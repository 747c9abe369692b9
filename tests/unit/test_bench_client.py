"""The benchmark's streaming client (bench/client.py) reads every body framing a server under test uses,
wherever the network splits it, and keeps or reopens its connection as HTTP says.

A raw-socket server here answers exactly as told: Gunicorn's chunked SSE (ours), chunks split at odd
places and sent in pieces, ``mlx_lm.server``'s HTTP/1.0 body read to the close, a ``Content-Length``
error, and a kept connection the server closes between requests.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bench import client

Answer = Callable[[socket.socket, int], None]  # writes one response on the connection (the request's index)


def events(texts: list[str], usage: bool = True) -> bytes:
    body = b"".join(b"data: %s\n\n" % json.dumps({"choices": [{"text": t}]}).encode() for t in texts)
    if usage:
        body += b"data: %s\n\n" % json.dumps({"choices": [], "usage": {"completion_tokens": len(texts)}}).encode()
    return body + b"data: [DONE]\n\n"


def chunked(body: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``body`` as HTTP chunks of ``sizes`` (cycled), then the last chunk."""
    at, i = 0, 0
    while at < len(body):
        piece = body[at : at + sizes[i % len(sizes)]]
        at, i = at + len(piece), i + 1
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


class RawServer:
    """Accepts connections and answers each request with ``answer``; counts connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/completions"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                while len(buf) < length:
                    buf += conn.recv(65536)
                json.loads(buf[:length])  # the client sent a JSON body
                buf = buf[length:]
                self.requests += 1
                try:
                    self.answer(conn, self.requests)
                except _Close:
                    return

    def close(self) -> None:
        self.sock.close()


class _Close(Exception):
    """Raised by an answer to close the connection after it."""


def send_in_pieces(conn: socket.socket, data: bytes, piece: int) -> None:
    for at in range(0, len(data), piece):
        conn.sendall(data[at : at + piece])
        time.sleep(0.001)  # each piece its own read on the other side


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


TEXTS = ["Hello", ",", " wor", "ld", " é", "\n", "!"]


def test_chunks_split_anywhere_are_read_whole(serve: Callable[[Answer], RawServer]) -> None:
    def answer(conn: socket.socket, _: int) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        # chunks of 1, 7 and 50 bytes split events and their UTF-8; sent 3 bytes at a time, so a read
        # ends inside a chunk's size line, its data and its closing CRLF
        send_in_pieces(conn, head + b"".join(chunked(events(TEXTS), [1, 7, 50])), 3)

    server = serve(answer)
    with client.Session() as session:
        for _ in range(2):
            result = client.stream_request(session, server.url, {"model": "m", "prompt": "p", "max_tokens": 7})
            assert result.ok, result.error
            assert result.text == "".join(TEXTS) and result.tokens == len(TEXTS)
    assert server.connections == 1 and server.requests == 2  # kept alive across requests


def test_a_body_read_to_the_close_and_an_error_with_a_length(serve: Callable[[Answer], RawServer]) -> None:
    def answer(conn: socket.socket, index: int) -> None:
        if index == 1:  # an error with a Content-Length; the connection stays
            body = b'{"error": {"message": "max_tokens too large"}}'
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        # mlx_lm.server: HTTP/1.0, no length, no chunks; the body ends when the server closes
        send_in_pieces(conn, b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + events(TEXTS, False), 5)
        raise _Close

    server = serve(answer)
    with client.Session() as session:
        refused = client.stream_request(session, server.url, {"model": "m", "prompt": "p", "max_tokens": 9})
        assert not refused.ok and refused.error.startswith("HTTP 400") and "max_tokens too large" in refused.error
        read = client.stream_request(session, server.url, {"model": "m", "prompt": "p", "max_tokens": 7})
        assert read.ok and read.text == "".join(TEXTS) and read.tokens == len(TEXTS)  # counted from chunks
        again = client.stream_request(session, server.url, {"model": "m", "prompt": "p", "max_tokens": 7})
        assert again.ok and again.text == "".join(TEXTS)
    assert server.connections == 2  # the 400 kept its connection; the read-to-close one did not


def test_a_kept_connection_the_server_closed_is_opened_again(serve: Callable[[Answer], RawServer]) -> None:
    def answer(conn: socket.socket, _: int) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.sendall(head + b"".join(chunked(events(["a", "b"]), [64])))
        raise _Close  # a keep-alive timeout: closed without a word, after the answer

    server = serve(answer)
    with client.Session() as session:
        for _ in range(3):
            result = client.stream_request(session, server.url, {"model": "m", "prompt": "p", "max_tokens": 2})
            assert result.ok and result.text == "ab", result.error
    assert server.connections == 3 and server.requests == 3


def test_a_server_that_goes_away_mid_stream_is_an_error_not_a_hang(serve: Callable[[Answer], RawServer]) -> None:
    def answer(conn: socket.socket, _: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + next(chunked(events(["a"]), [10])))
        raise _Close

    server = serve(answer)
    with client.Session() as session:
        result = client.stream_request(session, server.url, {"model": "m", "prompt": "p", "max_tokens": 2}, timeout=10)
    assert not result.ok and "closed" in result.error
