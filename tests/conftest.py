"""Shared fixtures: a real Gunicorn server (through `impetus serve`) on a free loopback port.

Fixtures stop their servers without waiting for the exit (it drains while the next test runs); the
session's end waits for them. The helpers behind them (the launcher, the Socket.IO recorder, chat(),
wait_idle(), the tiny models and the stand-in hub) are in tests/support/, which the benchmark imports
too; this file keeps only fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.models import default_model_folder
from tests.support.server import Server, reap_stopped, start_server, stop_server

if TYPE_CHECKING:
    from openai import OpenAI


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The servers the fixtures stopped without waiting (``stop_server(..., wait=False)``) have exited."""
    reap_stopped()


@pytest.fixture(scope="session", autouse=True)
def converted_default_model() -> None:
    """The default model converted into TEST_MODELS_DIR before any test: several modules read its folder
    there directly, and under pytest-xdist on a fresh clone the first test of one worker may not be the
    one that converts it (the conversion's file lock lets one worker convert while the other waits)."""
    default_model_folder()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv, wait=False)


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def hot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server told its machine is in a serious thermal state (batch capped at 2), pushing
    Socket.IO metrics every 0.1 s: for the thermal-adaptation and real-time tests."""
    srv = start_server(
        tmp_path_factory.mktemp("hot-server"),
        IMPETUS_FAULT_THERMAL_STATE="serious",
        IMPETUS_THERMAL_BATCH_SIZE="2",
        IMPETUS_THERMAL_INTERVAL="0.5",
        IMPETUS_METRICS_INTERVAL="0.1",
    )
    yield srv
    stop_server(srv, wait=False)
