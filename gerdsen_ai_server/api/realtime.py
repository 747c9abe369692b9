"""Socket.IO channel (one namespace, ``/``). Threading mode over simple-websocket: Gunicorn's gthread
worker carries it (no eventlet: Gunicorn >= 26 has no eventlet worker).

Server -> client events, each sent to its room:

    metrics        every IMPETUS_METRICS_INTERVAL s: engine counters, tok/s, memory, thermal state   room "metrics"
    hardware       the /api/hardware report: on connect, on request, when the thermal state changes   room "metrics"
    request_event  a generating request started / finished (TTFT, tokens, tok/s)                   room "requests"
    model_event    a model is loading, loaded, failed, unloaded, evicted, expired or deleted         room "models"
    pull_progress  a model pull's bytes and status                                                  room "models"

With API keys configured (IMPETUS_API_KEYS / IMPETUS_API_KEY_FILE) the Engine.IO handshake needs one
before any session exists (gerdsen_ai_server/web/guard.py): an ``Authorization: Bearer KEY`` header
(python-socketio: ``connect(url, headers=...)``) or, from a browser, which cannot set headers on a
WebSocket, the query parameter ``api_key=KEY`` (socket.io-client: ``io(url, {query: {api_key}})``);
without, 401 ``invalid_api_key``. A key in the connect ``auth`` (``{"api_key": KEY}``) must be right
too. The guard also checks the page's ``Origin`` (this server's own pages, or IMPETUS_CORS_ORIGINS),
counts each handshake against IMPETUS_RATE_LIMIT and caps sessions and the threads they hold.

Client -> server events (every payload validated by its pydantic model in schemas/realtime.py; a bad
one is answered with OpenAI's error envelope). Each event, unknown ones included, spends the caller's
IMPETUS_RATE_LIMIT budget as an HTTP request does (per key, else per address); past it the ack is
the 429 envelope (``rate_limit_exceeded``) and the event does nothing:

    subscribe / unsubscribe   rooms (``"metrics"``, ``["metrics", ...]`` or ``{"rooms": [...]}``);
                              ack ``{"rooms": [...joined]}`` or ``{"error": {...}, "rooms": [...]}``
    hardware                  ack: the /api/hardware report
    generate                  a chat completion request (as POST /v1/chat/completions, plus an optional
                              ``id``), run on the same engine path; streamed to this client only:
                                  token           {"id", "delta", "timestamp"}, as text arrives
                                  generate_done   {"id", "model", "text", "tool_calls", "finish_reason",
                                                   "usage", "timestamp"}, the last event
                                  generate_error  {"id", "error": {OpenAI envelope}, "timestamp"}, instead
                              the ack is the last event's payload. A disconnect cancels the generation
                              and frees its slot in the engine at its next step.
    cancel                    {"id"}: stop one of this client's generations; ack {"id", "cancelled"}

Every payload carries ``timestamp``, the server's Unix time when it was published. A client joins
the rooms named in its connect ``auth`` (``{"rooms": ["metrics", "requests"]}``), by default
"metrics" and "models"; ``subscribe`` / ``unsubscribe`` change that later (the ack lists the rooms
now joined). The client library re-sends ``auth`` when it reconnects, so a dropped connection
resumes its streams by itself.

Replicas (IMPETUS_REDIS_URL): Socket.IO uses Redis as its message queue, so ``request_event``,
``model_event`` and ``pull_progress`` published on any replica reach the clients of every replica.
``metrics`` and ``hardware`` describe one process and stay on it, as do a client's own ``generate``
events (its connection is here). Every room event carries ``replica`` (``host:pid`` of the process
that published it), so a dashboard can tell the replicas apart. Those go to Redis from a thread of
their own (``Outbox``): a slow or unreachable Redis delays or drops them, never the engine thread
that publishes them. Without Redis: all in-process, emitted on the publisher's thread.

Handlers run in fresh threads: they never call MLX (work for the engine goes through its queue).
Events come from the engine's event bus and are emitted on the publisher's thread; ``emit`` only
queues the packet for each client's writer thread, so the engine thread is not held up.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from typing import Any

import simple_websocket
from engineio.async_drivers._websocket_wsgi import SimpleWebSocketWSGI
from flask import Flask, current_app, g, request
from flask_socketio import ConnectionRefusedError, SocketIO, emit, join_room, leave_room, rooms
from pydantic import ValidationError
from socketio import RedisManager

from gerdsen_ai_server.api.chat import Started, start_chat
from gerdsen_ai_server.api.metrics import finish_tracking
from gerdsen_ai_server.api.openai import cancel_all
from gerdsen_ai_server.engine.protocol import EngineGone, TokenStream
from gerdsen_ai_server.monitoring.monitor import Monitor
from gerdsen_ai_server.schemas.realtime import GENERATION_ID, CancelRequest, ConnectAuth, GenerateRequest, RoomsRequest
from gerdsen_ai_server.serving.tools import answer_parts
from gerdsen_ai_server.web.errors import APIError, validation_error
from gerdsen_ai_server.web.guard import KEY_ID, OriginPolicy
from gerdsen_ai_server.web.request_log import access_log
from gerdsen_ai_server.web.security import FAILED_LOGINS, KEYS, KeyChecker, key_id, spend_budget

log = logging.getLogger(__name__)

socketio = SocketIO()
DEFAULT_ROOMS = ("metrics", "models")
EVENT_ROOMS = {"metrics": "metrics", "hardware": "metrics", "request_event": "requests",
               "model_event": "models", "pull_progress": "models"}
LOCAL_EVENTS = frozenset({"metrics", "hardware"})  # this process's own state: never through the queue
HOST = socket.gethostname()
ROUTE = "socket.io:generate"  # the route request events and metrics name


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


generations = Generations()


class Outbox:
    """Room events on their way to the message queue, published by one background thread. Redis
    publishes synchronously (a round trip; with Redis unreachable, a connect timeout and a retry),
    and events are published on the engine's thread. Bounded: when Redis cannot keep up, new events
    are dropped (logged) rather than piling up in memory."""

    def __init__(self, size: int = 10_000) -> None:
        self._queue: queue.Queue[tuple[str, dict[str, Any], str]] = queue.Queue(size)
        self.dropped = 0

    def put(self, event: str, payload: dict[str, Any], room: str) -> None:
        try:
            self._queue.put_nowait((event, payload, room))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("Socket.IO message queue (Redis) behind: %d events dropped so far", self.dropped)

    def run(self) -> None:
        while True:
            event, payload, room = self._queue.get()
            try:
                socketio.emit(event, payload, to=room)  # this replica's clients, then Redis for the others
            except Exception:  # never let one event end the thread
                log.exception("emitting %s failed", event)


outbox: Outbox | None = None  # set when IMPETUS_REDIS_URL is
key_ids: dict[str, str] = {}  # sid -> the id of the key it connected with: its rate-limit bucket


def init_realtime(app: Flask) -> None:
    global outbox
    options: dict[str, Any] = {}
    redis_url = app.config["IMPETUS_SETTINGS"].redis_url
    if redis_url:
        # A bounded connect: an unreachable Redis must not hold up the thread that publishes (the
        # engine's, for request and model events) for the kernel's TCP timeout. No read timeout: the
        # listener's subscription waits for messages indefinitely.
        options["client_manager"] = RedisManager(redis_url, channel="impetus-socketio",
                                                 redis_options={"socket_connect_timeout": 2})
    settings = app.config["IMPETUS_SETTINGS"]
    limit = settings.max_request_bytes
    # Engine.IO checks Origin with the guard's policy (guard.py refuses first, in the API's envelope)
    # and, for an origin it allows, sends the CORS headers a cross-origin polling client needs.
    # (``[]``, as before, switched Engine.IO's Origin check off: any page could connect.)
    socketio.init_app(app, async_mode="threading", cors_allowed_origins=OriginPolicy(settings).allows,
                      cors_credentials=False, max_http_buffer_size=limit, **options)
    bound_websocket_messages(limit)
    socketio.start_background_task(close_idle_handshakes, socketio.sleep)
    outbox = Outbox() if redis_url else None
    if outbox is not None:
        socketio.start_background_task(outbox.run)
    app.extensions["impetus"].events.subscribe(_forward)
    monitor: Monitor = app.extensions["impetus_monitor"]
    socketio.start_background_task(monitor.run, socketio.sleep)


CONNECT_GRACE_S = 10.0


def close_idle_handshakes(sleep: Any, grace: float = CONNECT_GRACE_S) -> None:
    """An Engine.IO session that never connects to the namespace never shows a key, yet it holds a
    WebSocket slot (a thread) for as long as it answers pings: close it after ``grace`` seconds.
    (A Socket.IO client connects in the same breath as the Engine.IO handshake.)"""
    first_seen: dict[str, float] = {}
    while True:
        sleep(grace / 4)
        try:
            eio, now = socketio.server.eio, time.monotonic()
            current = set(eio.sockets)
            for eio_sid in current:
                if socketio.server.manager.sid_from_eio_sid(eio_sid, "/") is not None:
                    first_seen.pop(eio_sid, None)
                elif now - first_seen.setdefault(eio_sid, now) >= grace:
                    first_seen.pop(eio_sid, None)
                    log.info("closing Engine.IO session %s: no Socket.IO connect within %.0f s", eio_sid, grace)
                    close_session(eio_sid)
            for gone in set(first_seen) - current:
                del first_seen[gone]
        except Exception:  # never let the sweep end
            log.exception("closing idle Engine.IO sessions failed")


def close_session(eio_sid: str | None = None) -> None:
    """Close one Engine.IO session (every one without ``eio_sid``) without waiting: Engine.IO's own
    ``disconnect`` waits for the session's send queue to drain, which never happens when its
    connection is already dead, and would hang the caller for good."""
    eio = socketio.server.eio
    sessions = [eio.sockets.get(eio_sid)] if eio_sid is not None else list(eio.sockets.values())
    for session in sessions:
        if session is not None:
            session.close(wait=False, reason=eio.reason.SERVER_DISCONNECT)


def bound_websocket_messages(limit: int) -> None:
    """A Socket.IO message is as large as an HTTP body may be (IMPETUS_MAX_REQUEST_BYTES). Engine.IO
    checks that only once a WebSocket message has been read whole, and in threading mode it opens
    simple-websocket with no limit, so one frame (before any key is asked for) could fill memory:
    give simple-websocket the limit, and it closes the connection as soon as a message exceeds it."""
    eio = socketio.server.eio
    eio._async = {**eio._async, "websocket": functools.partial(WakefulWebSocket, max_message_size=limit)}


class WakefulWebSocket(SimpleWebSocketWSGI):  # type: ignore[misc]
    """Engine.IO's threading WebSocket, whose wait for the next message wakes once a second to see
    whether the connection is gone. simple-websocket 1.1.0, closing a connection whose message is too
    big, wakes the waiting reader *before* it marks the connection closed; a reader woken in between
    waits again, forever, holding its Gunicorn thread (measured: half of such connections, so a few
    dozen oversized messages, sent before any key is asked for, took every Socket.IO thread and made
    SIGTERM wait out the graceful timeout)."""

    def wait(self) -> Any:
        while True:
            try:
                message = self.ws.receive(timeout=1.0)
            except simple_websocket.ConnectionClosed:
                return None
            if message is not None:
                return message
            if not self.ws.connected:
                return None


def replica() -> str:
    return f"{HOST}:{os.getpid()}"


def _forward(kind: str, payload: dict[str, Any]) -> None:
    room = EVENT_ROOMS.get(kind)
    if room is None:
        return
    payload = {**payload, "replica": replica()}
    if outbox is not None and kind not in LOCAL_EVENTS:
        outbox.put(kind, payload, room)
    else:
        socketio.emit(kind, payload, to=room, ignore_queue=kind in LOCAL_EVENTS)


def _to_client(event: str, payload: dict[str, Any], sid: str) -> None:
    """To one client of this process: with a message queue, no round trip through Redis per token."""
    socketio.emit(event, payload, to=sid, ignore_queue=True)


def _sid() -> str:
    return str(request.sid)  # type: ignore[attr-defined]


def _joined() -> list[str]:
    sid = _sid()
    return sorted(r for r in rooms() if r != sid)


def _hardware() -> dict[str, Any]:
    report = current_app.extensions["impetus_monitor"].hardware_report().model_dump()
    report["timestamp"] = time.time()
    return report


def _refusal(exc: ValidationError | APIError) -> APIError:
    return validation_error(exc) if isinstance(exc, ValidationError) else exc


def _invalid(exc: ValidationError | APIError) -> dict[str, Any]:
    """OpenAI's envelope for a payload that failed validation (or was refused)."""
    return _refusal(exc).envelope()


SERVER_ERROR = APIError(500, "The server had an error while processing your request.", code="internal_error")


@socketio.on("connect")
def _connect(auth: Any = None) -> None:
    try:
        given = ConnectAuth.model_validate(auth or {})
    except ValidationError as exc:
        envelope = _invalid(exc)
        raise ConnectionRefusedError(f"invalid_request_error: {envelope['error']['message']}", envelope) from None
    checker: KeyChecker | None = current_app.extensions.get(KEYS)
    if checker:
        # The guard let the handshake in with a valid key (its id is in the session's environ); a key
        # in ``auth`` as well must be right too, and then names the rate-limit bucket.
        ident = request.environ.get(KEY_ID)
        if given.api_key is not None:
            ident = key_id(given.api_key) if checker.matches(given.api_key) else None
        if ident is None:
            logins = current_app.extensions.get(FAILED_LOGINS)
            if logins is not None:  # a failed login, as over HTTP: no guessing keys here instead
                logins.fail(request.remote_addr)
            envelope = APIError(401, "Incorrect API key provided.", code="invalid_api_key").envelope()
            raise ConnectionRefusedError(f"invalid_api_key: {envelope['error']['message']}", envelope)
        key_ids[_sid()] = ident
    for room in given.rooms if given.rooms is not None else DEFAULT_ROOMS:
        join_room(room)
    if "metrics" in _joined():
        emit("hardware", _hardware())


@socketio.on("disconnect")
def _disconnect(*_reason: Any) -> None:
    generations.cancel(_sid())  # free the engine slots of whatever this client was generating
    key_ids.pop(_sid(), None)


def _over_budget() -> APIError | None:
    """Spend one request of the caller's IMPETUS_RATE_LIMIT budget for this event: the 429 past it."""
    try:
        spend_budget(key_ids.get(_sid()), request.remote_addr)
    except APIError as exc:
        return exc
    return None


@socketio.on("subscribe")
def _subscribe(data: Any = None) -> dict[str, Any]:
    return _change(data, join_room)


@socketio.on("unsubscribe")
def _unsubscribe(data: Any = None) -> dict[str, Any]:
    return _change(data, leave_room)


def _change(data: Any, action: Any) -> dict[str, Any]:
    refused = _over_budget()
    if refused is not None:
        return {**refused.envelope(), "rooms": _joined()}
    try:
        wanted = RoomsRequest.model_validate(data)
    except ValidationError as exc:
        return {**_invalid(exc), "rooms": _joined()}
    for room in wanted.rooms:
        action(room)
    return {"rooms": _joined()}


@socketio.on("hardware")
def _hardware_request(_data: Any = None) -> dict[str, Any]:
    """The hardware report, as this event's acknowledgement (the monitor caches it for a second:
    a client asking in a loop does not run the probes, nvidia-smi among them, each time)."""
    refused = _over_budget()
    return refused.envelope() if refused is not None else _hardware()


@socketio.on("cancel")
def _cancel(data: Any = None) -> dict[str, Any]:
    refused = _over_budget()
    if refused is not None:
        return refused.envelope()
    try:
        wanted = CancelRequest.model_validate(data)
    except ValidationError as exc:
        return _invalid(exc)
    return {"id": wanted.id, "cancelled": generations.cancel(_sid(), wanted.id) > 0}


@socketio.on("*")
def _unknown(event: str, _data: Any = None) -> dict[str, Any]:
    """An event this server does not know still spends the budget (else a free flood), then says so."""
    refused = _over_budget()
    if refused is not None:
        return refused.envelope()
    return APIError(400, f"Unknown event '{str(event)[:100]}'.", code="unknown_event").envelope()


@socketio.on("generate")
def _generate(data: Any = None) -> dict[str, Any]:
    """Runs in its own thread (python-socketio's async handlers), like an SSE stream in a request thread."""
    sid = _sid()
    raw_id = data.get("id") if isinstance(data, dict) else None
    gen_id = raw_id if isinstance(raw_id, str) and re.match(GENERATION_ID, raw_id) else f"gen-{uuid.uuid4().hex}"
    g.request_id = gen_id  # every log line written meanwhile names it, as an HTTP request's id
    began = time.perf_counter()
    answer = _run_generate(sid, gen_id, data)
    _access_line(sid, gen_id, g.get("generate_status", 200), began)
    return answer


def _access_line(sid: str, gen_id: str, status: int, began: float) -> None:
    """One ``impetus.access`` line per generation, with the fields of an HTTP request's (no prompt)."""
    duration_ms = round((time.perf_counter() - began) * 1000, 1)
    access_log.info("EMIT generate %s %.1fms", status, duration_ms, extra={
        "request_id": gen_id, "method": "EMIT", "route": ROUTE, "path": request.path, "status": status,
        "remote": request.remote_addr, "key_id": key_ids.get(sid), "stream": True, "duration_ms": duration_ms})


def _run_generate(sid: str, gen_id: str, data: Any) -> dict[str, Any]:
    drain = current_app.extensions.get("impetus_drain")
    try:
        if drain is not None and drain.draining.is_set():
            raise APIError(503, "The server is shutting down; retry on another replica.", code="server_shutting_down")
        spend_budget(key_ids.get(sid), request.remote_addr)  # IMPETUS_RATE_LIMIT, shared with the HTTP API
        body = GenerateRequest.model_validate(data)
        if body.n != 1:
            raise APIError(400, "Over Socket.IO a generation has one choice: n must be 1.", param="n",
                           code="invalid_value")
        if body.logprobs:  # token events carry text only: say so rather than drop what was asked for
            raise APIError(400, "The parameter 'logprobs' is not supported over Socket.IO; use "
                           "/v1/chat/completions.", param="logprobs", code="unsupported_parameter")
        g.impetus_route = ROUTE
        started_at = time.perf_counter()
        started = start_chat(body, "messages")
    except (ValidationError, APIError) as exc:
        return _fail(sid, gen_id, _refusal(exc))
    except Exception:  # as over HTTP: a 500 in the envelope, never a call left without its answer
        log.exception("generate failed")
        return _fail(sid, gen_id, SERVER_ERROR)
    streams = started.streams
    if not generations.add(sid, gen_id, streams):
        cancel_all(streams)
        return _fail(sid, gen_id, APIError(400, f"A generation with id '{gen_id}' is already running.", param="id",
                                           code="invalid_value"))
    if drain is not None:
        drain.enter()  # SIGTERM lets it finish, as it does an HTTP stream
    try:
        return _stream(sid, gen_id, started)
    except EngineGone as exc:
        return _fail(sid, gen_id, APIError(503, str(exc), code="engine_unavailable"))
    except APIError as exc:  # the deadline or an operator's cancel (api/requests.py), as over HTTP
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
    for kind, value in answer_parts(started.plan, stream):
        if kind == "error":
            return _fail(sid, gen_id, APIError(500, value, code="generation_failed"))
        if kind == "text":
            text.append(value)
            _to_client("token", {"id": gen_id, "delta": value, "timestamp": time.time()}, sid)
            continue
        calls, last = value
        prompt_tokens = len(started.prompt)
        done = {
            "id": gen_id, "model": started.loaded.model_id, "text": "".join(text),
            "tool_calls": [c.model_dump() for c in calls],
            "finish_reason": last.finish_reason,  # answer_parts': "tool_calls", or "length" for a cut call
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": last.completion_tokens,
                      "total_tokens": prompt_tokens + last.completion_tokens},
            "timestamp": time.time(),
        }
        _to_client("generate_done", done, sid)
        return done
    # The stream ended without a last event: it was cancelled (disconnect or ``cancel``).
    done = {"id": gen_id, "model": started.loaded.model_id, "text": "".join(text), "tool_calls": [],
            "finish_reason": "cancelled", "usage": None, "timestamp": time.time()}
    _to_client("generate_done", done, sid)
    return done


def _fail(sid: str, gen_id: str, error: APIError) -> dict[str, Any]:
    g.generate_status = error.status
    payload = {"id": gen_id, **error.envelope(), "timestamp": time.time()}
    _to_client("generate_error", payload, sid)
    return payload
