"""The Socket.IO server and the transport's limits: bounded WebSocket messages, idle handshakes closed.

``socketio`` is the one Flask-SocketIO server (threading mode over simple-websocket: Gunicorn's
gthread worker carries it). What is here keeps its connections from holding Gunicorn threads for
nothing: a WebSocket message is at most ``IMPETUS_MAX_REQUEST_BYTES`` (checked while it arrives, not
once it is whole), a reader wakes to see a closed connection, an Engine.IO session that never
connects to the namespace is closed, and shutdown closes every session without waiting on dead ones.
The guard in front (web/guard.py) caps sessions and the threads they hold.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import simple_websocket
from engineio.async_drivers._websocket_wsgi import SimpleWebSocketWSGI
from flask_socketio import SocketIO

log = logging.getLogger(__name__)

socketio = SocketIO()


def close_idle_handshakes(sleep: Any, grace: float) -> None:
    """An Engine.IO session that never connects to the namespace never shows a key, yet it holds a
    WebSocket slot (a thread) for as long as it answers pings: close it after ``grace`` seconds
    (IMPETUS_SOCKET_CONNECT_GRACE). (A Socket.IO client connects in the same breath as the Engine.IO
    handshake.)"""
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
                    log.info("closing Engine.IO session %s: no Socket.IO connect within %g s", eio_sid, grace)
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


def close_websockets() -> None:
    """Each open Socket.IO WebSocket holds a Gunicorn thread until it closes: close them all once the
    drain is over (their clients reconnect, to another replica), or the worker would wait out
    Gunicorn's graceful timeout for connections that never end by themselves. (app.py registers
    this with the shutdown drain: ``Drain.on_drained``.)"""
    if socketio.server is None:
        return
    close_session()  # every client, without waiting on a dead connection's queue


def bound_websocket_messages(limit: int) -> None:
    """A Socket.IO message is as large as an HTTP body may be (IMPETUS_MAX_REQUEST_BYTES). Engine.IO
    checks that only once a WebSocket message has been read whole, and in threading mode it opens
    simple-websocket with no limit, so one frame (before any key is asked for) could fill memory:
    give simple-websocket the limit, and it closes the connection as soon as a message exceeds it."""
    eio = socketio.server.eio
    eio._async = {**eio._async, "websocket": functools.partial(WakefulWebSocket, max_message_size=limit)}


class WakefulWebSocket(SimpleWebSocketWSGI):
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
