"""One launcher for every real server the tests and the benchmark start: ours (``impetus serve``, a real
Gunicorn), and the benchmark's peers (``mlx_lm.server``, llama-cpp-python's server).

``launch`` starts any command in its own session (so a stop reaches Gunicorn's worker too), logs to a
file and waits until a readiness path answers 200; ``start_server`` is ``impetus serve`` on a free
loopback port with the tests' models folder; ``stop_server`` ends either kind (the tests' fixtures without
waiting for the exit: ``reap_stopped`` at the session's end).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support import ROOT, TEST_MODELS_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process on loopback. ``name``, ``model`` and ``info`` are the benchmark's (which server,
    the model id it serves, what it says of itself)."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    name: str = "server"
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])


def launch(
    cmd: Sequence[str],
    env: dict[str, str],
    port: int,
    logs: Path,
    *,
    name: str = "server",
    ready_path: str = "/health/ready",
    timeout: float = 180,
) -> Server:
    """Start ``cmd`` (listening on ``port``) and return once ``GET ready_path`` answers 200.

    Raises, with the log, when the process exits first, when our server says its default model
    failed to load (its readiness reason), or after ``timeout`` seconds (a busy machine answers
    late: a poll that times out is asked again)."""
    log_path = logs / f"{name.replace(' ', '_').replace('/', '_')}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log_tail(200)}")
        try:
            r = requests.get(server.url + ready_path, timeout=5)
            if r.status_code == 200:
                return server
            if "failed to load" in str(r.json().get("reason", "")):  # ours: it will never be ready
                stop_server(server)
                raise RuntimeError(f"{name}'s default model failed to load:\n{server.log_tail(200)}")
        except (requests.RequestException, ValueError, AttributeError):  # not up yet, or a peer's non-JSON answer
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"{name} not ready in {timeout:.0f} s:\n{server.log_tail(200)}")


# Linux's prctl option: the signal this process gets when the thread that started it ends.
PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent() -> Callable[[], None] | None:
    """The server's pre-exec step: SIGTERM to it when this process dies (Linux's ``PR_SET_PDEATHSIG``),
    so a pytest (or xdist worker) killed by a timeout or ^C takes its servers down rather than leaving
    them to init: its ``pytest_sessionfinish`` never runs. Nothing where prctl is missing (macOS).

    Only from the main thread: the signal comes when the starting *thread* ends, and a server started
    from a pool thread (tests/api/test_cluster.py) would be stopped as soon as the pool closed."""
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:  # in the child between fork and exec: a system call, nothing that may lock
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died before the prctl: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start_server(tmp: Path, *, wait_ready: bool = True, **env: str) -> Server:
    """``impetus serve`` (``python -m gerdsen_ai_server.cli serve``) on a free loopback port, this process's
    environment plus ``env``, models from TEST_MODELS_DIR; ready (default model loaded) or, with
    ``wait_ready=False``, only live.

    The suite's servers run the default model on MLX (``IMPETUS_BACKEND=mlx``, unless this process's
    environment or ``env`` says otherwise): ``auto`` would put it on llama.cpp on a Linux CPU
    (engine/backends/choice.py), and the suite tests MLX there; tests/api/test_llamacpp.py and
    tests/api/test_backend_choice.py test llama.cpp and ``auto`` themselves."""
    port = free_port()
    environment = {
        "IMPETUS_BACKEND": "mlx",
        **os.environ,
        "IMPETUS_HOST": "127.0.0.1",
        "IMPETUS_PORT": str(port),
        "IMPETUS_MODELS_DIR": str(TEST_MODELS_DIR),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    return launch(
        [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"],
        environment,
        port,
        tmp,
        ready_path="/health/ready" if wait_ready else "/health/live",
    )


# Servers told to stop without waiting (``stop_server(..., wait=False)``), reaped by ``reap_stopped``.
_STOPPING: list[Server] = []


def stop_server(server: Server, *, wait: bool = True) -> None:
    """SIGTERM to the server's process group (Gunicorn's master and worker), SIGKILL after 30 s.

    ``wait=False`` sends the SIGTERM and returns at once: a server a test is done with drains and exits
    (1 to 3 s of mostly waiting: Gunicorn's 1 s poll, its 2 s linger on kept-alive connections) while the
    next test runs; ``reap_stopped`` (the tests' session end) waits for them. Only for a server whose
    exit nothing looks at: a restart on the same state, or a check of the exit, waits."""
    if server.process.poll() is not None:
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait:
        _wait_or_kill(server)
    else:
        _STOPPING.append(server)


def reap_stopped() -> None:
    """Wait for every server stopped with ``wait=False`` (SIGKILL to one still there after 30 s)."""
    while _STOPPING:
        _wait_or_kill(_STOPPING.pop())


def _wait_or_kill(server: Server) -> None:
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.process.wait(10)
