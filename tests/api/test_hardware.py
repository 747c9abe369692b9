"""GET /api/hardware on the real server, and thermal adaptation: a server whose machine reports a
serious thermal state caps its batch, and /health, /metrics and /api/hardware say so."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import psutil
import pytest
import requests
import socketio
from prometheus_client.parser import text_string_to_metric_families

from gerdsen_ai_server.schemas.hardware import HardwareReport
from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server

SECTIONS = ("cpu", "memory", "gpus", "frequency", "thermal", "mlx")


def test_hardware_report(server: Server) -> None:
    r = requests.get(f"{server.url}/api/hardware", timeout=30)
    assert r.status_code == 200, r.text
    report = HardwareReport.model_validate(r.json())
    for section in SECTIONS:  # a section is there, or null with the reason
        assert (getattr(report, section) is None) == (section in report.unavailable), section
    assert report.memory is not None and report.memory.total_bytes == psutil.virtual_memory().total
    assert report.cpu is not None and report.cpu.cores_logical == psutil.cpu_count()
    health = requests.get(f"{server.url}/health", timeout=30).json()
    assert report.mlx is not None
    assert (report.mlx.compute_dtype, report.mlx.blas, report.mlx.allocator) == (
        health["compute_dtype"],
        health["blas"],
        health["allocator"],
    )
    assert report.mlx.active_memory_bytes and report.mlx.active_memory_bytes > 0  # the model is in memory
    assert report.batch.max_batch == health["max_batch"] and report.batch.batch_limit is None
    if sys.platform.startswith("linux"):
        assert report.platform.probe == "linux"


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_a_hot_machine_caps_the_batch(hot_server: Server) -> None:
    deadline = time.monotonic() + 30
    while (health := requests.get(f"{hot_server.url}/health", timeout=30).json())["batch_limit"] is None:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert (health["thermal_state"], health["batch_limit"], health["max_batch"]) == ("serious", 2, 8)
    metrics = metric_values(requests.get(f"{hot_server.url}/metrics", timeout=30).text)
    assert metrics["impetus_batch_size_limit"] == 2 and metrics["impetus_batch_size_max"] == 8
    assert metrics["impetus_thermal_batch_limited"] == 1
    assert metrics["impetus_thermal_state{impetus_thermal_state=serious}"] == 1
    assert metrics["impetus_thermal_state{impetus_thermal_state=nominal}"] == 0
    report = HardwareReport.model_validate(requests.get(f"{hot_server.url}/api/hardware", timeout=30).json())
    assert report.thermal is not None and (report.thermal.state, report.thermal.source) == ("serious", "injected")
    assert report.throttling.throttled and "the thermal state is serious" in report.throttling.reasons
    assert report.batch.batch_limit == 2


def test_a_capped_batch_runs_two_sequences_at_a_time(hot_server: Server) -> None:
    seen: list[dict[str, Any]] = []
    sio = socketio.Client()
    sio.on("metrics", lambda data: seen.append(data["engine"]))
    sio.connect(hot_server.url, transports=["websocket"], auth={"rooms": ["metrics"]}, wait_timeout=30)
    try:

        def ask(i: int) -> None:
            body = {
                "model": DEFAULT_MODEL,
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Count to {i + 3}."}],
            }
            r = requests.post(f"{hot_server.base_url}/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sio.disconnect()
    busy = [s for s in seen if s["requests_in_flight"]]
    assert busy, "no metrics sample while the requests ran"
    assert max(s["active_sequences"] for s in busy) <= 2
    assert max(s["queued_sequences"] for s in busy) >= 1  # the others waited for a slot
