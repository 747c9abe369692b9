"""Fixtures for the third-party client suites (LangChain, the OpenAI Agents SDK, the npm clients):
they all talk to the session's one real server, and nothing else.

LangChain's standard tests are plain `async def` functions written for pytest-asyncio's auto mode;
this folder marks its own coroutine tests as asyncio ones, so the rest of the suite keeps
pytest-asyncio's strict default.
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import TINY_EMBEDDER
from tests.support.server import Server


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Mark this folder's coroutine tests (most are LangChain's, inherited) before pytest-asyncio
    looks at them; it decides at collection whether a function is its to run. One event loop for the
    session: langchain-openai and langchain-anthropic cache their async HTTP clients process-wide, and
    a client's pooled connection opened on an earlier test's (closed) loop fails the next test with
    "Event loop is closed"."""
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        marks = getattr(obj, "pytestmark", [])
        if not any(mark.name == "asyncio" for mark in marks):
            pytest.mark.asyncio(loop_scope="session")(obj)


class InternetBlocked(RuntimeError):
    """A client under test tried to connect somewhere other than loopback."""


def is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):  # a Unix socket's path
        return True
    host = str(address[0])
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def loopback_only(server: Server) -> Iterator[None]:
    """No client under test may reach the internet (tiktoken's encoding files, LangSmith, the Agents
    SDK's tracing exporter): a connection to anything but loopback raises, so a test that tried fails
    loudly instead of passing on a machine that happens to be online and hanging on one that is not.
    The session server starts first (a fixture of this one), outside the guard; it is a subprocess anyway."""
    true_connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> None:
        if not is_loopback(address):
            raise InternetBlocked(f"a client under test tried to reach {address!r}; only loopback is allowed")
        true_connect(sock, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = true_connect  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """This folder's own server: the default model on the llama.cpp backend (IMPETUS_BACKEND=llamacpp)
    beside a tiny MLX embedding model (TINY_EMBEDDER) for the embeddings clients.

    The suites test the wire formats the clients speak, which both backends share (tests/api covers
    each backend's generation); on a CPU llama.cpp decodes the 135M model ~6x faster than MLX, which
    makes LangChain's ~100 cases of up to 64 tokens about a minute's work instead of four."""
    from tests.support.server import start_server, stop_server
    from tests.support.tiny_models import build_tiny_bert

    models = tmp_path_factory.mktemp("clients-models")
    build_tiny_bert(models / TINY_EMBEDDER)
    srv = start_server(
        tmp_path_factory.mktemp("clients-server"),
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_MODELS_DIR=str(models),
        # One thread, as every llama.cpp server of the suite: llama.cpp's threads spin-wait, and two of
        # them on a 2-core machine that also runs the clients collapse to a few tokens/s.
        IMPETUS_LLAMACPP_THREADS="1",
    )
    yield srv
    stop_server(srv, wait=False)
