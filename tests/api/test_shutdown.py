"""SIGTERM during a stream: readiness turns 503 at once and new work is refused, the stream runs to
``[DONE]``, then the server exits 0 (gerdsen_ai_server/web/shutdown.py)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.server import start_server, stop_server

pytestmark = pytest.mark.server


@pytest.mark.slow
def test_sigterm_drains_a_running_stream_then_exits_zero(tmp_path: Path) -> None:
    srv = start_server(tmp_path, IMPETUS_SHUTDOWN_GRACE="60", IMPETUS_LOG_FORMAT="text")
    try:
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Count from one to fifty."}],
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
        }
        lines: list[str] = []
        first_chunk = threading.Event()

        def read_stream() -> None:
            with requests.post(f"{srv.base_url}/chat/completions", json=body, stream=True, timeout=120) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line:
                        lines.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first_chunk.wait(60)
        srv.process.send_signal(signal.SIGTERM)  # the master, as an orchestrator would
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready = requests.get(srv.url + "/health/ready", timeout=5)
            if ready.status_code == 503:
                break
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["reason"] == "the server is shutting down"
        assert reader.is_alive(), "the stream should still be running (make max_tokens larger)"
        refused = requests.post(
            f"{srv.base_url}/chat/completions", timeout=10, json={**body, "stream": False, "max_tokens": 1}
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert refused.headers["Retry-After"] == "1"

        reader.join(60)
        assert not reader.is_alive()
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert srv.process.wait(30) == 0
        assert "requests finished" in srv.log()
    finally:
        stop_server(srv)


@pytest.mark.slow
def test_sigterm_lets_a_socketio_generation_finish(tmp_path: Path) -> None:
    import socketio

    srv = start_server(tmp_path, IMPETUS_SHUTDOWN_GRACE="60", IMPETUS_LOG_FORMAT="text")
    try:
        client = socketio.Client(reconnection=False)
        tokens: list[str] = []
        first_token = threading.Event()
        done: list[dict] = []  # type: ignore[type-arg]

        def on_token(event: dict) -> None:  # type: ignore[type-arg]
            tokens.append(event["delta"])
            first_token.set()

        client.on("token", on_token)
        client.on("generate_done", done.append)
        client.connect(srv.url, transports=["websocket"], auth={"rooms": []}, wait_timeout=30)
        client.emit(
            "generate",
            {
                "model": DEFAULT_MODEL,
                "max_tokens": 48,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Count from one to fifty."}],
            },
        )
        assert first_token.wait(60)
        srv.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while requests.get(srv.url + "/health/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not done, "the generation should still be running (make max_tokens larger)"
        refused = client.call(
            "generate",
            {"model": DEFAULT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert refused["error"]["code"] == "server_shutting_down"
        deadline = time.monotonic() + 60
        while not done:
            assert time.monotonic() < deadline, "the generation did not finish within the grace period"
            time.sleep(0.1)
        assert done[0]["finish_reason"] in ("length", "stop") and done[0]["text"] == "".join(tokens)
        assert srv.process.wait(30) == 0
        assert "requests finished" in srv.log()
    finally:
        stop_server(srv)
