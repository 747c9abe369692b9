"""Server-Sent Events: one ``data:`` line per payload, and a streaming response that cancels its
engine streams when it ends, however it ends (finished, failed, or its client gone: a client that
went away frees its slot at the engine's next step)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flask import Response

from gerdsen_ai_server.engine.errors import EngineGone
from gerdsen_ai_server.engine.protocol import EventSource, TokenEvent
from gerdsen_ai_server.errors import APIError, error_body
from gerdsen_ai_server.serving.generation import cancel_all, relay, waiting
from gerdsen_ai_server.serving.running import ClientGone

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class TextChunk:
    """The SSE events of one choice's text chunks, which differ only in their text: ``render``
    (the chunk through its schema, ``sse(chunk_payload(...))``) runs once, on a marker text, and
    each token's event is that rendering with the token's text in the marker's place: the same
    bytes, without building, dumping and serialising the chunk's model a token (~15 µs of the
    request thread's GIL-holding time a token; bench/overhead.py measures the server at 16 streams).
    """

    _MARK = json.dumps("\x00impetus-text\x00")  # no text a model writes serialises to this

    def __init__(self, render: Callable[[str], str]) -> None:
        head, found, tail = render(json.loads(self._MARK)).partition(self._MARK)
        if not found or self._MARK in tail:
            raise ValueError("the chunk's rendering must hold its text exactly once")
        self._head, self._tail = head, tail

    def __call__(self, text: str) -> str:
        return self._head + json.dumps(text) + self._tail


class Last(str):
    """The last write of a stream that ended well (its final events and usage): ``openai_events``
    sends ``data: [DONE]`` in the same write, so the client gets the end of its answer at once."""


def writes(
    streams: Sequence[EventSource], render: Callable[[int, TokenEvent], list[str]], tail: Callable[[], list[str]]
) -> Iterator[str]:
    """The SSE writes of a streamed answer: each event of ``streams`` (one choice after the other,
    ``relay``) rendered by ``render``, the events that reached the reader together in one write
    (``waiting``), and the last choice's last events with ``tail`` (the usage, when asked for; the
    tail is called once every event was rendered). An error event ends the stream with its error
    after what ``render`` made of it. Chat and text completions share it (serving/chat.py,
    serving/completions.py).

    With IMPETUS_STREAM_COALESCE_MS (a stream's ``coalesce``), the writer waits that long after each write
    but the last, so the tokens that come meanwhile join the next write: one wake-up and one socket write
    an interval instead of a token (the hand-off's cost at many fast streams: docs/performance.md)."""
    out: list[str] = []
    last = len(streams) - 1
    try:
        for index, event in relay(streams):
            out += render(index, event)
            if event.error:
                yield "".join([*out, sse(error_body(500, event.error, code="generation_failed"))])
                return
            if out and not waiting(streams[index]) and not (event.done and index == last):
                yield "".join(out)  # else it goes with what follows: the next events, or the tail at the end
                out.clear()
                linger(streams[index])
    except (APIError, EngineGone) as exc:  # the request ends here: its deadline, a cancel, the engine gone
        if out and not isinstance(exc, ClientGone):
            yield "".join(out)  # what was rendered before goes out first, as it did a chunk at a time
        raise
    out += tail()
    yield Last("".join(out))


def linger(stream: EventSource) -> None:
    """After a write of ``stream``'s answer: wait its ``coalesce`` (IMPETUS_STREAM_COALESCE_MS), so that the
    tokens coming meanwhile join the next write; less if the answer ends meanwhile; not at all before its first
    token is out nor once its last event was read."""
    pause = getattr(stream, "coalesce", 0.0)
    if pause and getattr(stream, "first_token_at", None) is not None and not getattr(stream, "finished", True):
        getattr(stream, "wait_end", time.sleep)(pause)


def coalesced(chunks: Iterator[str], stream: EventSource) -> Iterator[str]:
    """``chunks`` (an answer's events as rendered from ``stream``, one at a time: Anthropic's Messages and the
    Responses API) in the writes ``writes`` makes: what was rendered goes out once nothing more is queued, and
    once its first token is out the writer waits the stream's ``coalesce`` after each write, less if the
    answer ends."""
    out: list[str] = []
    try:
        for chunk in chunks:
            out.append(chunk)
            if waiting(stream):
                continue
            yield "".join(out)
            out.clear()
            linger(stream)
        if out:
            yield "".join(out)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # its own cleanup (the engine streams cancelled) runs now, not when it is collected


def sse_response(body: Iterator[str]) -> Response:
    """``body`` as a text/event-stream response, unbuffered by proxies."""
    return Response(body, mimetype="text/event-stream", headers=SSE_HEADERS)


def openai_events(chunks: Iterator[str], streams: list[Any]) -> Iterator[str]:
    """OpenAI's stream: the chunks, an error event if the engine stopped or the request was
    ended (its deadline, an operator's cancel), then ``data: [DONE]``; the streams cancelled at the end."""
    try:
        for chunk in chunks:
            if isinstance(chunk, Last):  # the answer is complete: the end goes with it, in one write
                yield chunk + sse("[DONE]")
                return
            yield chunk
    except EngineGone as exc:
        yield sse(error_body(503, str(exc), code="engine_unavailable"))
    except ClientGone:
        return  # nobody to tell
    except APIError as exc:  # the deadline, or an operator's cancel (serving/running.py)
        yield sse(exc.envelope())
    finally:
        cancel_all(streams)  # a client that went away frees its slot at the next step
    yield sse("[DONE]")


def event_stream(chunks: Iterator[str], streams: list[Any]) -> Response:
    return sse_response(openai_events(chunks, streams))
