"""Faults against the real server (short versions of the soak's): mass disconnects, bursts over
the queue limit, a corrupt model loaded during traffic. Every accepted request ends complete or
with a clear error, and the engine returns to idle."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.http import health, wait_idle
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

STORY = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    "temperature": 0,
}


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("faults")
    # The operator's allow-list (IMPETUS_MODEL_PATHS) lets a request name the broken model outside the models dir.
    srv = start_server(tmp, IMPETUS_MAX_BATCH="4", IMPETUS_MAX_QUEUE="4", IMPETUS_MODEL_PATHS=str(tmp / "outside"))
    yield srv
    stop_server(srv, wait=False)


def rss(srv: Server) -> int:
    import psutil

    worker = psutil.Process(srv.process.pid).children()[0]
    return int(worker.memory_info().rss)


@pytest.mark.slow
def test_fifty_clients_disconnect_mid_stream(small_queue: Server) -> None:
    srv = small_queue
    host, port = srv.url.removeprefix("http://").split(":")
    body = requests.models.complexjson.dumps({**STORY, "max_tokens": 400, "stream": True})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(request)
            wanted, seen = rng.randint(0, 6), b""  # 0: hang up before the first token
            while seen.count(b"data: ") < wanted:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                seen += chunk
            with lock:
                outcomes["503" if b" 503 " in seen[:20] else "dropped"] += 1

    wait_idle(srv)
    baseline = rss(srv)
    threads = []
    for i in range(50):  # in waves, so that some get admitted, some queue and some are refused
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
        time.sleep(0.02)
    for t in threads:
        t.join(120)
    wait_idle(srv)
    stats = health(srv)
    assert stats["requests_in_flight"] == 0
    assert sum(outcomes.values()) == 50
    # The server still answers properly, and memory is back near where it was.
    r = requests.post(f"{srv.base_url}/chat/completions", json={**STORY, "max_tokens": 5}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    growth = rss(srv) / baseline - 1
    print(f"50 disconnects: {dict(outcomes)}; RSS growth {growth:+.1%}")
    assert growth < 0.25


@pytest.mark.slow
@pytest.mark.timing
def test_burst_of_four_times_the_queue(small_queue: Server) -> None:
    srv = small_queue
    wait_idle(srv)
    capacity = 8  # IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE
    results: list[tuple[int, float, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(4 * capacity)

    def client() -> None:
        start.wait()
        t = time.monotonic()
        r = requests.post(f"{srv.base_url}/chat/completions", json={**STORY, "max_tokens": 24}, timeout=300)
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        with lock:
            results.append((r.status_code, time.monotonic() - t, tokens))
            if r.status_code == 503:
                assert r.headers["Retry-After"] and r.json()["error"]["code"] == "server_overloaded"

    threads = [threading.Thread(target=client) for _ in range(4 * capacity)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    codes = Counter(code for code, _, _ in results)
    assert set(codes) <= {200, 503} and codes[200] >= capacity and codes[503] >= capacity, codes
    refused = [elapsed for code, elapsed, _ in results if code == 503]
    assert max(refused) < 2.0  # refused at once, not after waiting
    assert all(tokens == 24 for code, _, tokens in results if code == 200)  # the admitted ones finish whole
    print(f"burst of {4 * capacity}: {dict(codes)}, slowest refusal {max(refused) * 1000:.0f} ms")
    wait_idle(srv)


def test_corrupt_model_during_traffic(small_queue: Server) -> None:
    srv = small_queue
    broken = small_queue.log_path.parent / "outside" / "broken-model"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    results: list[int] = []

    def traffic() -> None:
        for _ in range(3):
            results.append(
                requests.post(
                    f"{srv.base_url}/chat/completions", json={**STORY, "max_tokens": 8}, timeout=120
                ).status_code
            )

    worker = threading.Thread(target=traffic)
    worker.start()
    r = requests.post(f"{srv.url}/api/models/load", json={"model": str(broken)}, timeout=120)
    worker.join(300)
    assert r.status_code == 422 and r.json()["error"]["code"] == "model_load_failed"
    assert results == [200, 200, 200]
    assert health(srv)["ready"] is True


@pytest.mark.slow
def test_engine_death_restarts_the_worker(tmp_path: Path) -> None:
    srv = start_server(tmp_path, IMPETUS_FAULT_ENGINE_CRASH_AFTER_STEPS="5")
    try:
        first = health(srv)["pid"]
        r = requests.post(f"{srv.base_url}/chat/completions", json={**STORY, "max_tokens": 50}, timeout=60)
        assert r.status_code in (500, 503) and "engine" in r.json()["error"]["message"]
        deadline, restarted = time.monotonic() + 120, False
        while time.monotonic() < deadline:
            try:
                ready = requests.get(f"{srv.url}/health/ready", timeout=5)
                if ready.status_code == 200 and health(srv)["pid"] != first:
                    restarted = True
                    break
            except (requests.RequestException, ValueError):  # between workers: refused, no answer, half a body
                pass
            time.sleep(0.25)
        assert restarted, srv.log()[-3000:]
        assert "inference engine died" in srv.log()
        assert srv.process.poll() is None  # the master lives on
    finally:
        stop_server(srv, wait=False)
