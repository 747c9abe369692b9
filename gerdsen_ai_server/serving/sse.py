"""Server-Sent Events: one ``data:`` line per payload, and a streaming response that cancels its
engine streams when it ends, however it ends (finished, failed, or its client gone: a client that
went away frees its slot at the engine's next step)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response

from gerdsen_ai_server.engine.errors import EngineGone
from gerdsen_ai_server.errors import APIError, error_body
from gerdsen_ai_server.serving.generation import cancel_all
from gerdsen_ai_server.serving.running import ClientGone

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


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
