"""GET /metrics on the real server, parsed with prometheus_client's own parser; counters and
histograms move after real chat requests."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server

CHAT = "/v1/chat/completions"
FAMILIES = {
    "impetus_http_requests": "counter",
    "impetus_http_request_duration_seconds": "histogram",
    "impetus_time_to_first_token_seconds": "histogram",
    "impetus_prompt_tokens": "counter",
    "impetus_completion_tokens": "counter",
    "impetus_request_tokens_per_second": "histogram",
    "impetus_queue_depth": "gauge",
    "impetus_active_sequences": "gauge",
    "impetus_batch_size_limit": "gauge",
    "impetus_prompt_cache_hits": "counter",
    "impetus_prompt_cache_misses": "counter",
    "impetus_prompt_cache_tier_hits": "counter",  # by tier: ram, disk (engine/prompt_cache.py)
    "impetus_prompt_cache_tier_bytes": "gauge",  # by tier: live, ram, disk
    "impetus_model_resident_bytes": "gauge",
    "impetus_process_resident_memory_bytes": "gauge",
    "impetus_tokens_per_second": "gauge",
    "impetus_engine_generated_tokens": "counter",
    "impetus_thermal_state": "gauge",
    "impetus_engine_alive": "gauge",
}


def scrape(server: Server) -> tuple[dict[str, str], Callable[..., float]]:
    r = requests.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    types, samples = {}, {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    return types, value


def test_exposition_has_every_family(server: Server) -> None:
    types, value = scrape(server)
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert value("impetus_engine_alive") == 1
    assert value("impetus_model_resident_bytes", model=DEFAULT_MODEL) > 1e6
    assert value("impetus_process_resident_memory_bytes") > value("impetus_model_resident_bytes", model=DEFAULT_MODEL)


def test_counters_move_after_chat_requests(server: Server) -> None:
    _, before = scrape(server)
    body = {
        "model": DEFAULT_MODEL,
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    r = requests.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    with requests.post(
        f"{server.base_url}/chat/completions", json={**body, "stream": True}, stream=True, timeout=120
    ) as streamed:
        assert streamed.status_code == 200
        assert b"[DONE]" in b"".join(streamed.iter_content(None))
    bad = requests.post(f"{server.base_url}/chat/completions", json={"model": DEFAULT_MODEL}, timeout=30)
    assert bad.status_code == 400

    # Latency and token histograms are observed when a response is closed, just after its last byte
    # reached the client: poll briefly for the last ones.
    latest: list[Callable[..., float]] = []

    def moved(name: str, **labels: str) -> float:
        return latest[-1](name, **labels) - before(name, **labels)

    deadline = time.monotonic() + 10
    while True:
        latest.append(scrape(server)[1])
        settled = (
            moved("impetus_http_request_duration_seconds_count", route=CHAT, method="POST") >= 3
            and moved("impetus_time_to_first_token_seconds_count", model=DEFAULT_MODEL) >= 2
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert moved("impetus_http_requests_total", route=CHAT, method="POST", status="200") >= 2
    assert moved("impetus_http_requests_total", route=CHAT, method="POST", status="400") >= 1
    assert moved("impetus_http_request_duration_seconds_count", route=CHAT, method="POST") >= 3
    assert moved("impetus_time_to_first_token_seconds_count", model=DEFAULT_MODEL) >= 2
    assert moved("impetus_time_to_first_token_seconds_sum", model=DEFAULT_MODEL) > 0
    assert moved("impetus_prompt_tokens_total", model=DEFAULT_MODEL) >= 2 * usage["prompt_tokens"]
    assert moved("impetus_completion_tokens_total", model=DEFAULT_MODEL) >= usage["completion_tokens"] + 1
    assert moved("impetus_sequences_total", model=DEFAULT_MODEL, outcome="finished") >= 2
    assert moved("impetus_engine_generated_tokens_total") >= usage["completion_tokens"]
    assert moved("impetus_prompt_cache_hits_total") + moved("impetus_prompt_cache_misses_total") >= 2


def test_openmetrics_on_request(server: Server) -> None:
    r = requests.get(f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=30)
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    names = {family.name for family in parse_openmetrics(r.text)}
    assert {"impetus_http_requests", "impetus_thermal_state", "impetus_queue_depth"} <= names
