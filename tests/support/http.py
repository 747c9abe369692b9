"""Plain-HTTP helpers against a running server: one ``chat()``, one ``wait_idle()``, and ``/health``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import requests

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

# A short greedy chat with the default model: what ``chat()`` sends unless told otherwise.
CHAT_BODY: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 3,
    "temperature": 0,
}


def root_url(server: Server | str) -> str:
    """A server's root URL (``http://127.0.0.1:PORT``), given the server or that URL."""
    return server.url if isinstance(server, Server) else server.rstrip("/")


def chat(
    server: Server | str,
    body: Mapping[str, Any] | None = None,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120,
    **fields: Any,
) -> requests.Response:
    """``POST /v1/chat/completions`` and its response, whatever its status.

    The body is ``body`` as given (valid or not: the hardening tests send broken ones), else CHAT_BODY
    with ``fields`` in place of its own (``model=``, ``max_tokens=``, ``messages=``, ``seed=``, ...);
    ``data`` sends those raw bytes instead, as JSON."""
    if data is None:
        data = json.dumps(dict(body) if body is not None else {**CHAT_BODY, **fields}).encode()
    return requests.post(
        f"{root_url(server)}/v1/chat/completions",
        data=data,
        timeout=timeout,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def health(server: Server | str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``GET /health``'s body (the admin's view where ``headers`` carry an admin key)."""
    return dict(requests.get(f"{root_url(server)}/health", headers=dict(headers or {}), timeout=10).json())


def in_flight(server: Server | str, headers: Mapping[str, str] | None = None) -> int:
    """Requests the engine holds now (``/health``'s ``requests_in_flight``)."""
    return int(health(server, headers)["requests_in_flight"])


def wait_idle(server: Server | str, timeout: float = 60, headers: Mapping[str, str] | None = None) -> float:
    """Seconds until the engine held no request; fails, showing ``/health``, after ``timeout``."""
    start = time.monotonic()
    while (stats := health(server, headers))["requests_in_flight"]:
        assert time.monotonic() - start < timeout, f"engine never drained: {stats}"
        time.sleep(0.05)
    return time.monotonic() - start
