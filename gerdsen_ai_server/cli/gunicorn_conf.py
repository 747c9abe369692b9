"""Gunicorn configuration for Impetus, read from the same ``IMPETUS_*`` settings as the app.

Used by ``impetus serve`` as ``-c python:gerdsen_ai_server.cli.gunicorn_conf``; the repository's
``gunicorn.conf.py`` re-exports it, so plain ``gunicorn`` run from the repository root picks it
up too (``gunicorn -c gunicorn.conf.py``; the app is set below as ``wsgi_app``).

Why these choices (docs/architecture.md has the measurements):

* One worker process. The loaded models, the engine's queue and every Socket.IO session live in
  that one process, and all MLX work runs on the engine's single OS thread. A second worker would
  load a second copy of every model and split Socket.IO sessions between processes. Scale out with
  more replicas (processes or pods) behind a sticky load balancer, not with more workers.

* ``gthread``, not eventlet. Gunicorn >= 26 has no eventlet worker (removed after its 25.x
  deprecation) and eventlet itself is deprecated upstream. Request threads only enqueue work and
  read their own response queue; MLX releases the GIL while it computes, so with gthread and one
  engine thread ``/health`` stayed at p99 < 10 ms (measured 5-7 ms) while 4 streams decoded on 2
  cores. Flask-SocketIO runs in ``threading`` mode over simple-websocket on the same threads.

* ``threads`` well above the stream cap. Every open SSE stream or WebSocket holds one thread for
  its whole life (measured: 20 streams on 16 threads left ``/health`` waiting for seconds). The
  engine refuses streams beyond IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE with 503, so with the
  default 64 threads a probe always finds a free one.

* Slow clients hold no thread: plain gthread gives a connection a thread as soon as it connects and
  then waits for its headers without a timeout, so ~70 sockets sending a header line every 3 s
  kept ``/health/live`` from answering. ``http_worker.ImpetusWorker`` (a ``ThreadWorker``) reads each
  request head on its main loop and hands the request to a thread only once the head is in; body
  reads and response writes then wait at most IMPETUS_READ_TIMEOUT on the client.

* No ``preload_app``: MLX (and the engine thread) must be created in the worker, after fork;
  a thread started in the master would not survive the fork.

* ``timeout``: with gthread the worker's heartbeat comes from its main loop, not from request
  threads, so a long generation or an open stream never trips it; it only restarts a worker whose
  main loop is wedged (for example something holding the GIL for two minutes). The app factory
  must therefore return quickly: the default model loads in the background (``/health/ready``).
"""

from __future__ import annotations

import math
import sys

from gunicorn.glogging import Logger as _GunicornLogger

from gerdsen_ai_server.cli.commands import WSGI_APP, base_url
from gerdsen_ai_server.config import Settings

_settings = Settings()


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


wsgi_app = WSGI_APP
bind = [_bind_address(_settings.host, _settings.port)]
workers = 1
# gthread, with request heads read on the main loop and every wait on a client bounded
# (IMPETUS_HEADER_TIMEOUT, IMPETUS_READ_TIMEOUT): see gerdsen_ai_server/cli/http_worker.py.
worker_class = "gerdsen_ai_server.cli.http_worker.ImpetusWorker"
threads = _settings.threads
timeout = 120
# SIGTERM: the app drains for up to IMPETUS_SHUTDOWN_GRACE (shutdown.py), then Gunicorn closes what is left.
graceful_timeout = math.ceil(_settings.shutdown_grace) + 10
keepalive = 5
accesslog = None  # the app logs each request, with its id, route and duration (request_log.py)
errorlog = "-"
loglevel = _settings.log_level
logger_class = (
    "gerdsen_ai_server.cli.gunicorn_conf.JsonLogger" if _settings.log_format == "json" else "gunicorn.glogging.Logger"
)
proc_name = "impetus"
# Gunicorn's control socket defaults to one fixed path per user ($XDG_RUNTIME_DIR or ~/.gunicorn),
# which two servers on one machine (tests, replicas) would fight over. We do not use gunicornc.
control_socket_disable = True


def when_ready(server) -> None:
    """Log the base URL once the sockets are bound (the real port, when IMPETUS_PORT=0)."""
    host, port = _settings.host, _settings.port
    for listener in getattr(server, "LISTENERS", []):
        try:
            address = listener.sock.getsockname()
        except (AttributeError, OSError):
            continue
        if isinstance(address, tuple):
            port = address[1]
            break
    server.log.info("Impetus %s: OpenAI API at %s", _version(), base_url(host, port))


def _version() -> str:
    from gerdsen_ai_server import __version__

    return __version__


def post_fork(server, worker) -> None:
    """In the new worker, before the app and MLX allocate anything or start a thread: under glibc's
    malloc, fix its mmap threshold, so freed KV-cache and activation buffers go back to the system,
    and cap its arenas (gerdsen_ai_server.runtime.memory; jemalloc, when preloaded, needs neither)."""
    from gerdsen_ai_server.runtime.memory import allocator, set_arena_max, set_mmap_threshold

    if allocator() == "glibc":
        set_mmap_threshold(_settings.malloc_mmap_threshold)
        set_arena_max(_settings.malloc_arena_max)


def post_worker_init(worker) -> None:
    """Log which BLAS the worker's MLX actually got (see gerdsen_ai_server.runtime.blas); make SIGTERM drain."""
    from gerdsen_ai_server.runtime.blas import blas_in_use
    from gerdsen_ai_server.web.shutdown import install_sigterm_drain

    if sys.platform.startswith("linux"):
        from gerdsen_ai_server.runtime.memory import allocator

        worker.log.info("BLAS in use: %s; C allocator: %s", blas_in_use(), allocator())
    install_sigterm_drain(worker, _settings.shutdown_grace)


def worker_int(worker) -> None:
    """SIGINT / SIGQUIT: Gunicorn's quick exit, no drain; running streams are cut."""
    worker.log.warning("worker interrupted: quick shutdown, running requests are cut")


def worker_abort(worker) -> None:
    """SIGABRT: the master found the worker's main loop wedged past ``timeout``."""
    worker.log.error("worker timed out (no heartbeat for %s s): aborting it", timeout)


class JsonLogger(_GunicornLogger):
    """Gunicorn's own lines (start, bind, worker exits) as JSON too, with IMPETUS_LOG_FORMAT=json."""

    def _set_handler(self, log, output, fmt, stream=None):
        from gerdsen_ai_server.web.request_log import JsonFormatter

        super()._set_handler(log, output, JsonFormatter(), stream)
