"""Server-Sent Events: one ``data:`` line per payload, and a streaming response that cancels its
engine streams when it ends, however it ends (finished, failed, or its client gone: a client that
went away frees its slot at the engine's next step)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from gerdsen_ai_server.engine.errors import EngineGone
from gerdsen_ai_server.errors import APIError, error_body
from gerdsen_ai_server.serving.generation import cancel_all
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


def sse_response(body: Iterator[str]) -> Response:
    """``body`` as a text/event-stream response, unbuffered by proxies."""
    return Response(body, mimetype="text/event-stream", headers=SSE_HEADERS)


def openai_events(chunks: Iterator[str], streams: list[Any]) -> Iterator[str]:
    """OpenAI's stream: the chunks, an error event if the engine stopped or the request was
    ended (its deadline, an operator's cancel), then ``data: [DONE]``; the streams cancelled at the end."""
    try:
        yield from chunks
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
