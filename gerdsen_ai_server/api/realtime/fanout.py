"""Room events from the engine's event bus to the clients of every replica, through an outbox when Redis is the queue.

``request_event``, ``model_event`` and ``pull_progress`` published on any replica reach the clients
of every replica when Socket.IO uses Redis as its message queue (IMPETUS_REDIS_URL); ``metrics`` and
``hardware`` describe one process and stay on it, as do a client's own ``generate`` events (its
connection is here). Every room event carries ``replica`` (``host:pid`` of the process that
published it), so a dashboard can tell the replicas apart. Those go to Redis from a thread of their
own (``Outbox``): a slow or unreachable Redis delays or drops them, never the engine thread that
publishes them. Without Redis: all in-process, emitted on the publisher's thread; ``emit`` only
queues the packet for each client's writer thread, so the engine thread is not held up.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
from typing import Any

from gerdsen_ai_server.api.realtime.transport import socketio

log = logging.getLogger(__name__)

EVENT_ROOMS = {
    "metrics": "metrics",
    "hardware": "metrics",
    "request_event": "requests",
    "model_event": "models",
    "pull_progress": "models",
}
LOCAL_EVENTS = frozenset({"metrics", "hardware"})  # this process's own state: never through the queue
HOST = socket.gethostname()


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


class Fanout:
    """The event bus's subscriber: each room event to its room, through ``outbox`` when one is set
    (IMPETUS_REDIS_URL), else emitted at once."""

    def __init__(self, outbox: Outbox | None) -> None:
        self.outbox = outbox

    def forward(self, kind: str, payload: dict[str, Any]) -> None:
        room = EVENT_ROOMS.get(kind)
        if room is None:
            return
        payload = {**payload, "replica": replica()}
        if self.outbox is not None and kind not in LOCAL_EVENTS:
            self.outbox.put(kind, payload, room)
        else:
            socketio.emit(kind, payload, to=room, ignore_queue=kind in LOCAL_EVENTS)


def replica() -> str:
    return f"{HOST}:{os.getpid()}"


def to_client(event: str, payload: dict[str, Any], sid: str) -> None:
    """To one client of this process: with a message queue, no round trip through Redis per token."""
    socketio.emit(event, payload, to=sid, ignore_queue=True)
