"""One Socket.IO recorder: every event a client receives, stamped with the local time it arrived."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import socketio


class Recorder:
    """Every event a Socket.IO client receives, stamped with the local time it arrived, and how many
    times it connected: `client.on(name, recorder.record(name))`, `client.on("connect", recorder.connected)`."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, Any]] = []
        self.connects = 0
        self.cond = threading.Condition()

    def record(self, name: str) -> Callable[[Any], None]:
        def handler(data: Any) -> None:
            with self.cond:
                self.events.append((name, time.time(), data))
                self.cond.notify_all()

        return handler

    def connected(self) -> None:
        with self.cond:
            self.connects += 1
            self.cond.notify_all()

    def of(self, name: str) -> list[tuple[float, Any]]:
        with self.cond:
            return [(at, data) for n, at, data in self.events if n == name]

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out; saw {[e[0] for e in self.events][-20:]}"


def listen(
    url: str, events: Iterable[str], client: socketio.Client | None = None, **connect: Any
) -> tuple[socketio.Client, Recorder]:
    """A Socket.IO client (``client``, else one that does not reconnect) recording ``events`` and its
    connects, connected to ``url`` over WebSocket (``connect``: ``socketio.Client.connect``'s options)."""
    client = client if client is not None else socketio.Client(reconnection=False)
    recorder = Recorder()
    for name in events:
        client.on(name, recorder.record(name))
    client.on("connect", recorder.connected)
    client.connect(url, **{"transports": ["websocket"], "wait_timeout": 30, **connect})
    return client, recorder
