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
