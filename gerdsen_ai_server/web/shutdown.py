"""Graceful shutdown: on SIGTERM, readiness turns 503 at once, new work gets 503, requests already
running (streams included) get up to ``IMPETUS_SHUTDOWN_GRACE`` seconds to finish, then the worker
leaves through Gunicorn's own graceful path and the master exits 0.

Why the worker keeps its listener open meanwhile: Gunicorn's master closes its copy of the listening
socket on SIGTERM, but the worker holds its own; had the worker stopped accepting at once (Gunicorn's
default), new connections would queue in the kernel unanswered until the worker exits, and a load
balancer's readiness check would hang instead of reading 503. So the worker goes on accepting and
answering (probes: 503 not ready; new work: 503 ``server_shutting_down`` with ``Retry-After``)
until its running requests are done or the grace period is over, and only then stops.

What counts as running: every HTTP request between the WSGI call and the close of its response
(so an SSE stream until its last byte), except the probes and Socket.IO, whose long-lived
connections would otherwise hold every shutdown for the whole grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, request
from werkzeug.wsgi import ClosingIterator

from gerdsen_ai_server.web.errors import APIError

log = logging.getLogger(__name__)

UNCOUNTED_PREFIXES = ("/health", "/metrics", "/socket.io")


class Drain:
    """The app's shutdown state: a flag and a count of running requests."""

    def __init__(self) -> None:
        self.draining = threading.Event()
        self._active = 0
        self._idle = threading.Condition()

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> None:
        with self._idle:
            self._active += 1

    def leave(self) -> None:
        with self._idle:
            self._active -= 1
            if self._active <= 0:
                self._idle.notify_all()

    def begin(self) -> None:
        self.draining.set()

    def wait_idle(self, timeout: float) -> bool:
        """True when no counted request is running, False when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


class CountingMiddleware:
    """WSGI middleware: counts each request until its response is closed."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], drain: Drain) -> None:
        self.wsgi_app = wsgi_app
        self.drain = drain

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(UNCOUNTED_PREFIXES):
            return self.wsgi_app(environ, start_response)
        self.drain.enter()
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            self.drain.leave()
            raise
        return ClosingIterator(body, [self.drain.leave])


def drain_of(app: Flask) -> Drain:
    return app.extensions["impetus_drain"]


def init_shutdown(app: Flask) -> None:
    drain = Drain()
    app.extensions["impetus_drain"] = drain
    app.wsgi_app = CountingMiddleware(app.wsgi_app, drain)  # type: ignore[method-assign]

    @app.before_request
    def _refuse_new_work() -> None:
        if drain.draining.is_set() and not request.path.startswith(UNCOUNTED_PREFIXES):
            raise APIError(503, "The server is shutting down; retry on another replica.",
                           code="server_shutting_down", headers={"Retry-After": "1"})


def close_websockets(app: Flask) -> None:
    """Each open Socket.IO WebSocket holds a Gunicorn thread until it closes: close them all once the
    drain is over (their clients reconnect, to another replica), or the worker would wait out
    Gunicorn's graceful timeout for connections that never end by themselves."""
    socketio = app.extensions.get("socketio")
    if socketio is None or socketio.server is None:
        return
    from gerdsen_ai_server.api.realtime import close_session

    try:
        close_session()  # every client, without waiting on a dead connection's queue
    except Exception:  # noqa: BLE001 - shutting down anyway
        log.exception("closing the Socket.IO connections failed")


def install_sigterm_drain(worker: Any, grace: float) -> None:
    """Gunicorn ``post_worker_init``: SIGTERM drains first, then runs the worker's own exit."""
    app = worker.wsgi
    drain = drain_of(app) if isinstance(app, Flask) and "impetus_drain" in app.extensions else None
    if drain is None:
        return
    gunicorn_exit = worker.handle_exit

    def on_sigterm(signum: int, frame: Any) -> None:
        if drain.draining.is_set():
            return
        drain.begin()

        def finish() -> None:  # not in the handler itself: logging takes locks the main thread may hold
            log.info("SIGTERM: not ready; letting %d running request(s) finish (up to %g s)", drain.active, grace)
            started = time.monotonic()
            idle = drain.wait_idle(grace)
            log.info("shutdown: %s after %.1f s; stopping the worker",
                     "requests finished" if idle else f"grace of {grace:g} s over, {drain.active} still running",
                     time.monotonic() - started)
            close_websockets(app)
            gunicorn_exit(signum, frame)

        threading.Thread(target=finish, name="impetus-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
