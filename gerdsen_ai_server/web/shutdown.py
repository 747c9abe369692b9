"""Graceful shutdown: on SIGTERM, readiness turns 503 at once, new work gets 503, requests already
running (streams included) get up to ``IMPETUS_SHUTDOWN_GRACE`` seconds to finish, then the worker
leaves through Gunicorn's own graceful path and the master exits 0.

Why the worker keeps its listener open meanwhile: Gunicorn's master closes its copy of the listening
socket on SIGTERM, but the worker holds its own; had the worker stopped accepting at once (Gunicorn's
default), new connections would queue in the kernel unanswered until the worker exits, and a load
balancer's readiness check would hang instead of reading 503. So the worker goes on accepting and
answering (probes: 503 not ready; new work: 503 ``server_shutting_down`` with ``Retry-After``)
until its running requests are done or the grace period is over, runs what was registered to run
once the drain is over (``Drain.on_drained``: app.py registers closing Socket.IO's WebSockets, which
would otherwise hold the worker for Gunicorn's whole graceful timeout), and only then stops.

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

from gerdsen_ai_server.services import services
from gerdsen_ai_server.web.errors import APIError

log = logging.getLogger(__name__)

UNCOUNTED_PREFIXES = ("/health", "/metrics", "/socket.io")


class Drain:
    """The app's shutdown state: a flag and a count of running requests."""

    def __init__(self) -> None:
        self.draining = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        self._on_drained: list[Callable[[], None]] = []

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

    def on_drained(self, close: Callable[[], None]) -> None:
        """Run ``close`` once the drain is over, before the worker exits: for what holds a thread
        and never ends by itself (a WebSocket). The web layer names no such thing; app.py wires it."""
        self._on_drained.append(close)

    def drained(self) -> None:
        """The drain is over: run every ``on_drained`` callback (one that fails is logged, not fatal)."""
        for close in self._on_drained:
            try:
                close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("closing %s after the drain failed", getattr(close, "__name__", close))

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


def init_shutdown(app: Flask) -> Drain:
    """Count requests, refuse new work while draining; the drain goes into ``services().drain``."""
    drain = Drain()
    services(app).drain = drain
    app.wsgi_app = CountingMiddleware(app.wsgi_app, drain)  # type: ignore[method-assign]

    @app.before_request
    def _refuse_new_work() -> None:
        if drain.draining.is_set() and not request.path.startswith(UNCOUNTED_PREFIXES):
            raise APIError(
                503,
                "The server is shutting down; retry on another replica.",
                code="server_shutting_down",
                headers={"Retry-After": "1"},
            )

    return drain


def _drain_of(app: Any) -> Drain | None:
    """The drain of an app that create_app built (None for any other WSGI app)."""
    if not isinstance(app, Flask):
        return None
    try:
        return services(app).drain
    except KeyError:  # a Flask app without the services
        return None


def install_sigterm_drain(worker: Any, grace: float) -> None:
    """Gunicorn ``post_worker_init``: SIGTERM drains first, then runs the worker's own exit."""
    drain = _drain_of(worker.wsgi)
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
            log.info(
                "shutdown: %s after %.1f s; stopping the worker",
                "requests finished" if idle else f"grace of {grace:g} s over, {drain.active} still running",
                time.monotonic() - started,
            )
            drain.drained()
            gunicorn_exit(signum, frame)

        threading.Thread(target=finish, name="impetus-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
