"""Shared fixtures: a real Gunicorn server (through `impetus serve`) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
# Converted models are cached here between runs (the first conversion takes a few seconds).
TEST_MODELS_DIR = Path(os.environ.get("IMPETUS_TEST_MODELS_DIR", ROOT / "build" / "test-models"))
DEFAULT_MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


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


def start_server(tmp: Path, *, wait_ready: bool = True, **env: str) -> Server:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    environment = {
        **os.environ,
        "IMPETUS_HOST": "127.0.0.1",
        "IMPETUS_PORT": str(port),
        "IMPETUS_MODELS_DIR": str(TEST_MODELS_DIR),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"],
            cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 180
    path = "/health/ready" if wait_ready else "/health/live"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            r = requests.get(server.url + path, timeout=2)
            if r.status_code == 200:
                return server
            if "failed to load" in r.json().get("reason", ""):
                stop_server(server)
                raise RuntimeError(f"server's default model failed to load:\n{server.log()}")
        except (requests.ConnectionError, requests.Timeout):  # a busy machine answers late: ask again
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not ready in time:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def hot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server told its machine is in a serious thermal state (batch capped at 2), pushing
    Socket.IO metrics every 0.1 s: for the thermal-adaptation and real-time tests."""
    srv = start_server(tmp_path_factory.mktemp("hot-server"), IMPETUS_FAULT_THERMAL_STATE="serious",
                       IMPETUS_THERMAL_BATCH_SIZE="2", IMPETUS_THERMAL_INTERVAL="0.5", IMPETUS_METRICS_INTERVAL="0.1")
    yield srv
    stop_server(srv)
