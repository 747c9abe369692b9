"""Socket.IO channel (one namespace, ``/``). Threading mode over simple-websocket: Gunicorn's gthread
worker carries it (no eventlet: Gunicorn >= 26 has no eventlet worker).

Server -> client events, each sent to its room:

    metrics        every IMPETUS_METRICS_INTERVAL s: engine counters, tok/s, memory, thermal state   room "metrics"
    hardware       the /api/hardware report: on connect, on request, when the thermal state changes   room "metrics"
    request_event  a generating request started / finished (TTFT, tokens, tok/s)                   room "requests"
    model_event    a model is loading, loaded, failed, unloaded, evicted, expired or deleted         room "models"
    pull_progress  a model pull's bytes and status                                                  room "models"

With API keys configured (IMPETUS_API_KEYS / IMPETUS_API_KEY_FILE) a connection needs one, in its
connect ``auth`` (``{"api_key": KEY}``, what a browser can send) or an ``Authorization: Bearer KEY``
header on the handshake; without, it is refused with ``invalid_api_key``.

Every payload carries ``timestamp``, the server's Unix time when it was published. A client joins
the rooms named in its connect ``auth`` (``{"rooms": ["metrics", "requests"]}``), by default
"metrics" and "models"; ``subscribe`` / ``unsubscribe`` change that later (the ack lists the rooms
now joined). The client library re-sends ``auth`` when it reconnects, so a dropped connection
resumes its streams by itself.

Handlers run in fresh threads: they never call MLX (work for the engine goes through its queue).
Events come from the engine's event bus and are emitted on the publisher's thread; ``emit`` only
queues the packet for each client's writer thread, so the engine thread is not held up.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, current_app, request
from flask_socketio import ConnectionRefusedError, SocketIO, emit, join_room, leave_room, rooms

from ..monitor import Monitor
from ..security import KeyChecker, load_keys, presented_key

log = logging.getLogger(__name__)

socketio = SocketIO()
ROOMS = ("metrics", "requests", "models")
DEFAULT_ROOMS = ("metrics", "models")
EVENT_ROOMS = {"metrics": "metrics", "hardware": "metrics", "request_event": "requests",
               "model_event": "models", "pull_progress": "models"}
KEYS = "impetus_socket_keys"


def init_realtime(app: Flask) -> None:
    socketio.init_app(app, async_mode="threading", cors_allowed_origins=[])
    app.extensions[KEYS] = load_keys(app.config["IMPETUS_SETTINGS"])
    app.extensions["impetus"].events.subscribe(_forward)
    monitor: Monitor = app.extensions["impetus_monitor"]
    socketio.start_background_task(monitor.run, socketio.sleep)


def _forward(kind: str, payload: dict[str, Any]) -> None:
    room = EVENT_ROOMS.get(kind)
    if room is not None:
        socketio.emit(kind, payload, to=room)


def _requested_rooms(data: Any) -> list[str] | None:
    """Rooms named by ``"metrics"``, ``["metrics", ...]`` or ``{"rooms": [...]}``; None if malformed."""
    if isinstance(data, dict):
        data = data.get("rooms", data.get("room"))
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, str) for r in data):
        return None
    return data


def _joined() -> list[str]:
    sid = request.sid  # type: ignore[attr-defined]
    return sorted(r for r in rooms() if r != sid)


def _hardware() -> dict[str, Any]:
    report = current_app.extensions["impetus_monitor"].hardware_report().model_dump()
    report["timestamp"] = time.time()
    return report


@socketio.on("connect")
def _connect(auth: Any = None) -> None:
    checker: KeyChecker = current_app.extensions[KEYS]
    if checker:
        key = auth.get("api_key") if isinstance(auth, dict) else None
        key = key if isinstance(key, str) and key else presented_key()
        if key is None or not checker.matches(key):
            raise ConnectionRefusedError("invalid_api_key: this server needs an API key (connect auth: {api_key: KEY})")
    wanted = _requested_rooms(auth) if isinstance(auth, dict) and ("rooms" in auth or "room" in auth) else None
    for room in wanted if wanted is not None else DEFAULT_ROOMS:
        if room in ROOMS:
            join_room(room)
    if "metrics" in _joined():
        emit("hardware", _hardware())


@socketio.on("subscribe")
def _subscribe(data: Any = None) -> dict[str, Any]:
    return _change(data, join_room)


@socketio.on("unsubscribe")
def _unsubscribe(data: Any = None) -> dict[str, Any]:
    return _change(data, leave_room)


def _change(data: Any, action: Any) -> dict[str, Any]:
    wanted = _requested_rooms(data)
    unknown = [r for r in wanted or [] if r not in ROOMS]
    if wanted is None or unknown:
        return {"error": f"unknown room(s) {unknown or data!r}; rooms are {', '.join(ROOMS)}", "rooms": _joined()}
    for room in wanted:
        action(room)
    return {"rooms": _joined()}


@socketio.on("hardware")
def _hardware_request(_data: Any = None) -> dict[str, Any]:
    """The hardware report, as this event's acknowledgement."""
    return _hardware()
