"""The Socket.IO ``generate`` event: a chat completion streamed to one client, on the HTTP API's engine path.

The request is validated as POST /v1/chat/completions is (plus an optional ``id``), spends the
caller's IMPETUS_RATE_LIMIT budget, and runs through serving's ``start_chat``; its text arrives as
``token`` events, then one ``generate_done`` (or ``generate_error``, OpenAI's envelope), and the ack
is the last event's payload. A disconnect or ``cancel`` stops it (``Generations``) and frees its slot
in the engine at its next step. SIGTERM's drain lets it finish, as it does an HTTP stream, and it is
measured and logged as an HTTP request is (``request_event``, one ``impetus.access`` line).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from flask import g, request
from pydantic import ValidationError

from gerdsen_ai_server.api.realtime.fanout import to_client
from gerdsen_ai_server.engine.errors import EngineGone
from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.schemas.realtime import GENERATION_ID, GenerateRequest
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.chat import Started, start_chat
from gerdsen_ai_server.serving.generation import cancel_all
from gerdsen_ai_server.serving.tools import answer_parts
from gerdsen_ai_server.serving.tracking import finish_tracking
from gerdsen_ai_server.web.errors import APIError, validation_error
from gerdsen_ai_server.web.rate_limits import spend_budget
from gerdsen_ai_server.web.request_log import access_log

log = logging.getLogger(__name__)

ROUTE = "socket.io:generate"  # the route request events and metrics name
SERVER_ERROR = APIError(500, "The server had an error while processing your request.", code="internal_error")


class Generations:
    """Each client's running generations, so that a disconnect or ``cancel`` can stop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sid: dict[str, dict[str, list[TokenStream]]] = {}

    def add(self, sid: str, gen_id: str, streams: list[TokenStream]) -> bool:
        with self._lock:
            running = self._by_sid.setdefault(sid, {})
            if gen_id in running:
                return False
            running[gen_id] = streams
            return True

    def remove(self, sid: str, gen_id: str) -> None:
        with self._lock:
            running = self._by_sid.get(sid, {})
            running.pop(gen_id, None)
            if not running:
                self._by_sid.pop(sid, None)

    def cancel(self, sid: str, gen_id: str | None = None) -> int:
        with self._lock:
            running = self._by_sid.get(sid, {})
            chosen = list(running.values()) if gen_id is None else [running[gen_id]] if gen_id in running else []
        for streams in chosen:
            cancel_all(streams)
        return len(chosen)

    def count(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._by_sid.values())


def refusal(exc: ValidationError | APIError) -> APIError:
    return validation_error(exc) if isinstance(exc, ValidationError) else exc


def generate(generations: Generations, key_ids: Mapping[str, str], sid: str, data: Any) -> dict[str, Any]:
    """Runs in its own thread (python-socketio's async handlers), like an SSE stream in a request thread.
    ``key_ids``: each session's key id (its rate-limit bucket), as the channel knows it now."""
    raw_id = data.get("id") if isinstance(data, dict) else None
    gen_id = raw_id if isinstance(raw_id, str) and re.match(GENERATION_ID, raw_id) else f"gen-{uuid.uuid4().hex}"
    g.request_id = gen_id  # every log line written meanwhile names it, as an HTTP request's id
    began = time.perf_counter()
    answer = _run_generate(generations, key_ids, sid, gen_id, data)
    _access_line(key_ids.get(sid), gen_id, g.get("generate_status", 200), began)
    return answer


def _access_line(key: str | None, gen_id: str, status: int, began: float) -> None:
    """One ``impetus.access`` line per generation, with the fields of an HTTP request's (no prompt)."""
    duration_ms = round((time.perf_counter() - began) * 1000, 1)
    access_log.info(
        "EMIT generate %s %.1fms",
        status,
        duration_ms,
        extra={
            "request_id": gen_id,
            "method": "EMIT",
            "route": ROUTE,
            "path": request.path,
            "status": status,
            "remote": request.remote_addr,
            "key_id": key,
            "stream": True,
            "duration_ms": duration_ms,
        },
    )


def _run_generate(
    generations: Generations, key_ids: Mapping[str, str], sid: str, gen_id: str, data: Any
) -> dict[str, Any]:
    drain = services().drain
    try:
        if drain is not None and drain.draining.is_set():
            raise APIError(503, "The server is shutting down; retry on another replica.", code="server_shutting_down")
        spend_budget(key_ids.get(sid), request.remote_addr)  # IMPETUS_RATE_LIMIT, shared with the HTTP API
        body = GenerateRequest.model_validate(data)
        if body.n != 1:
            raise APIError(
                400, "Over Socket.IO a generation has one choice: n must be 1.", param="n", code="invalid_value"
            )
        if body.logprobs:  # token events carry text only: say so rather than drop what was asked for
            raise APIError(
                400,
                "The parameter 'logprobs' is not supported over Socket.IO; use /v1/chat/completions.",
                param="logprobs",
                code="unsupported_parameter",
            )
        g.impetus_route = ROUTE
        started_at = time.perf_counter()
        started = start_chat(body, "messages")
    except (ValidationError, APIError) as exc:
        return _fail(sid, gen_id, refusal(exc))
    except Exception:  # as over HTTP: a 500 in the envelope, never a call left without its answer
        log.exception("generate failed")
        return _fail(sid, gen_id, SERVER_ERROR)
    streams = started.streams
    if not generations.add(sid, gen_id, streams):
        cancel_all(streams)
        return _fail(
            sid,
            gen_id,
            APIError(400, f"A generation with id '{gen_id}' is already running.", param="id", code="invalid_value"),
        )
    if drain is not None:
        drain.enter()  # SIGTERM lets it finish, as it does an HTTP stream
    try:
        return _stream(sid, gen_id, started)
    except EngineGone as exc:
        return _fail(sid, gen_id, APIError(503, str(exc), code="engine_unavailable"))
    except APIError as exc:  # the deadline or an operator's cancel (api/admin/requests.py), as over HTTP
        return _fail(sid, gen_id, exc)
    except Exception:
        log.exception("generate failed")
        return _fail(sid, gen_id, SERVER_ERROR)
    finally:
        cancel_all(streams)
        generations.remove(sid, gen_id)
        if drain is not None:
            drain.leave()
        finish_tracking(streams, g.get("generate_status", 200), time.perf_counter() - started_at)


def _stream(sid: str, gen_id: str, started: Started) -> dict[str, Any]:
    stream: TokenStream = started.streams[0]
    text: list[str] = []
    thought: list[str] = []  # a thinking model's reasoning: ``reasoning`` events, apart from ``token``
    splitter = started.reasoning.splitter() if started.reasoning else None
    for kind, value in answer_parts(started.plan, stream, splitter):
        if kind == "error":
            return _fail(sid, gen_id, APIError(500, value, code="generation_failed"))
        if kind in ("text", "reasoning"):
            (text if kind == "text" else thought).append(value)
            to_client(
                "token" if kind == "text" else "reasoning",
                {"id": gen_id, "delta": value, "timestamp": time.time()},
                sid,
            )
            continue
        calls, last = value
        prompt_tokens = len(started.prompt)
        done = {
            "id": gen_id,
            "model": started.loaded.model_id,
            "text": "".join(text),
            "tool_calls": [c.model_dump() for c in calls],
            "finish_reason": last.finish_reason,  # answer_parts': "tool_calls", or "length" for a cut call
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "total_tokens": prompt_tokens + last.completion_tokens,
            },
            "timestamp": time.time(),
        }
        if thought:  # only for a model that thought: other answers keep their shape
            done["reasoning"] = "".join(thought)
        to_client("generate_done", done, sid)
        return done
    # The stream ended without a last event: it was cancelled (disconnect or ``cancel``).
    done = {
        "id": gen_id,
        "model": started.loaded.model_id,
        "text": "".join(text),
        "tool_calls": [],
        "finish_reason": "cancelled",
        "usage": None,
        "timestamp": time.time(),
    }
    to_client("generate_done", done, sid)
    return done


def _fail(sid: str, gen_id: str, error: APIError) -> dict[str, Any]:
    g.generate_status = error.status
    payload = {"id": gen_id, **error.envelope(), "timestamp": time.time()}
    to_client("generate_error", payload, sid)
    return payload
