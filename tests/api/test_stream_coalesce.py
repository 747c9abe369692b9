"""IMPETUS_STREAM_COALESCE_MS: a streamed answer's writer waits after each write, so the tokens that come
meanwhile leave together: fewer socket writes (HTTP chunks under Gunicorn), every token still its own SSE
event, the same text, and the first token never held (serving/sse.py ``writes``, and ``coalesced`` for
Anthropic's Messages and the Responses API)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support import DEFAULT_MODEL
from tests.support.server import Server, start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

INTERVAL_S = 0.3
BODY = {"model": DEFAULT_MODEL, "prompt": "Once upon a time, in a small village,", "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("coalesce"), IMPETUS_STREAM_COALESCE_MS=str(int(INTERVAL_S * 1000)))
    yield srv
    stop_server(srv)


def chunks(server: Server, body: dict[str, object], path: str = "/v1/completions") -> tuple[list[bytes], float]:
    """The HTTP chunks of a streamed completion (one a write of the server's), and the seconds it took."""
    where = urlsplit(server.url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.hostname}:{where.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    with socket.create_connection((where.hostname, where.port), timeout=120) as sock:
        sock.sendall(head + payload)
        data = b""
        while part := sock.recv(65536):
            data += part
    took = time.perf_counter() - start
    headers, _, rest = data.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200"), headers
    if b"chunked" not in headers.lower():  # not streamed: one body
        return [rest], took
    out = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out, took
        out.append(rest[:size])
        rest = rest[size + 2 :]


def test_tokens_leave_together_each_still_its_own_event(server: Server) -> None:
    writes, took = chunks(server, {**BODY, "stream": True, "stream_options": {"include_usage": True}})
    events = [line[6:] for c in writes for line in c.decode().split("\n") if line.startswith("data: ")]
    texts = [json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]" and json.loads(e)["choices"]]
    usage = next(json.loads(e)["usage"] for e in events if e != "[DONE]" and json.loads(e).get("usage"))
    assert len([t for t in texts if t]) >= usage["completion_tokens"] - 1 >= 8  # a token an event, as before
    # One write an interval at most, and the first and the last: far fewer than a write a token.
    assert len(writes) <= took / INTERVAL_S + 3, (len(writes), took)
    whole = chunks(server, BODY)[0]
    assert json.loads(b"".join(whole))["choices"][0]["text"] == "".join(texts)  # the same answer


def test_the_first_token_is_not_held(server: Server) -> None:
    body = {**BODY, "max_tokens": 1, "stream": True}
    writes, took = chunks(server, body)
    assert took < INTERVAL_S * 3  # a one-token answer ends without waiting out intervals
    assert b"[DONE]" in writes[-1]


@pytest.mark.parametrize(
    ("path", "body", "delta"),
    [
        (
            "/v1/messages",
            {"max_tokens": 24, "messages": [{"role": "user", "content": "Tell me a story."}]},
            "text_delta",
        ),
        ("/v1/responses", {"max_output_tokens": 24, "input": "Tell me a story."}, "response.output_text.delta"),
    ],
)
def test_messages_and_responses_streams_coalesce_too(
    server: Server, path: str, body: dict[str, object], delta: str
) -> None:
    writes, took = chunks(server, {"model": DEFAULT_MODEL, "stream": True, "temperature": 0, **body}, path)
    deltas = sum(c.count(delta.encode()) for c in writes)
    assert deltas >= 8  # a token an event
    # the events before the first token (message_start, response.created ...) go as they come: a few more
    assert len(writes) <= took / INTERVAL_S + 8, (len(writes), deltas, took)
