"""Serving behaviour of the real Gunicorn process: streaming, disconnects, probes under load."""

from __future__ import annotations

import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from gerdsen_ai_server.runtime.memory import find_jemalloc
from tests.support import DEFAULT_MODEL
from tests.support.http import in_flight, wait_idle
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

# Greedy, this prompt gives a story of several hundred tokens (no early end-of-turn).
LONG = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    "temperature": 0,
}


@pytest.mark.slow
def test_first_chunk_arrives_before_generation_ends(server: Server) -> None:
    wait_idle(server)
    arrivals: list[float] = []
    start = time.monotonic()
    body = {**LONG, "max_tokens": 40, "stream": True}
    with requests.post(f"{server.base_url}/chat/completions", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 10
    # Tokens are sent as they are made: the first long before the last.
    assert arrivals[0] < arrivals[-1] / 3, arrivals


def test_disconnect_frees_the_engine(server: Server) -> None:
    wait_idle(server)
    body = {**LONG, "max_tokens": 2000, "stream": True}
    r = requests.post(f"{server.base_url}/chat/completions", json=body, stream=True, timeout=120)
    lines = r.iter_lines()
    for _ in range(3):
        next(lines)
    assert in_flight(server) == 1
    r.close()  # the client goes away mid-stream
    drained = wait_idle(server, timeout=10)
    print(f"engine idle {drained:.2f} s after the client closed")  # 2000 tokens would take minutes


def test_disconnect_of_raw_socket_mid_stream(server: Server) -> None:
    wait_idle(server)
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps({**LONG, "max_tokens": 2000, "stream": True})
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n{payload}".encode()
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        assert in_flight(server) == 1
    wait_idle(server, timeout=10)


@pytest.mark.timing
def test_health_stays_fast_while_four_streams_generate(server: Server) -> None:
    wait_idle(server)
    stop = threading.Event()

    def stream() -> None:
        body = {**LONG, "max_tokens": 120, "stream": True}
        with requests.post(f"{server.base_url}/chat/completions", json=body, stream=True, timeout=300) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    workers = [threading.Thread(target=stream) for _ in range(4)]
    for w in workers:
        w.start()
    while in_flight(server) < 4:
        time.sleep(0.05)
    latencies = []
    session = requests.Session()
    for _ in range(100):
        t = time.perf_counter()
        assert session.get(f"{server.url}/health", timeout=10).status_code == 200
        latencies.append((time.perf_counter() - t) * 1000)
        time.sleep(0.01)
    busy = in_flight(server)
    stop.set()
    for w in workers:
        w.join()
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[98]
    print(f"/health while 4 streams decode: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert busy == 4, "the streams ended before the probes did; the measurement is void"
    # The target is p99 < 50 ms (measured 14 ms on a quiet machine); the test asserts a generous
    # bound so that other load on a 2-core CI machine cannot make it flaky.
    assert p99 < 250, latencies


@pytest.mark.slow
def test_probes_before_the_model_is_ready(tmp_path: Path) -> None:
    srv = start_server(
        tmp_path, wait_ready=False, IMPETUS_DEFAULT_MODEL=str(tmp_path / "missing-model"), IMPETUS_AUTOLOAD="false"
    )
    try:
        assert requests.get(f"{srv.url}/health/live", timeout=10).status_code == 200
        deadline = time.monotonic() + 30
        while True:
            r = requests.get(f"{srv.url}/health/ready", timeout=10)
            assert r.status_code == 503
            if "failed to load" in r.json()["reason"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "failed to load" in r.json()["reason"]
        assert requests.get(f"{srv.url}/health", timeout=10).json()["ready"] is False
        r = requests.post(
            f"{srv.base_url}/chat/completions",
            json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        stop_server(srv, wait=False)


def test_health_reports_version_uptime_and_models(server: Server) -> None:
    body = requests.get(f"{server.url}/health", timeout=10).json()
    assert body["status"] == "ok" and body["ready"] is True
    assert body["version"] and body["uptime_s"] > 0
    assert [m["id"] for m in body["models"]] == [DEFAULT_MODEL]
    # `make test` installs OpenBLAS on Linux and `impetus serve` preloads it; fp32 is then the fast path.
    assert body["blas"] in ("openblas", "reference", "accelerate")
    assert body["compute_dtype"] in ("float32", "as stored")
    # `make setup` installs jemalloc on Debian/Ubuntu and `impetus serve` preloads it (IMPETUS_MALLOC=auto).
    if sys.platform.startswith("linux"):
        assert body["allocator"] == ("jemalloc" if find_jemalloc() else "glibc")
    assert requests.get(f"{server.url}/health/ready", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.timing
def test_full_server_answers_503_with_retry_after_at_once(tmp_path: Path) -> None:
    srv = start_server(tmp_path, IMPETUS_MAX_BATCH="1", IMPETUS_MAX_QUEUE="0")
    try:
        body = {**LONG, "max_tokens": 400, "stream": True}
        with requests.post(f"{srv.base_url}/chat/completions", json=body, stream=True, timeout=120) as r:
            next(r.iter_lines())
            started = time.monotonic()
            refused = requests.post(f"{srv.base_url}/chat/completions", json={**LONG, "max_tokens": 5}, timeout=30)
            elapsed = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert elapsed < 2.0
        wait_idle(srv)
        assert (
            requests.post(f"{srv.base_url}/chat/completions", json={**LONG, "max_tokens": 3}, timeout=60).status_code
            == 200
        )
    finally:
        stop_server(srv, wait=False)
