"""Bad input at volume: 1,000 generated malformed, oversized and odd requests against the real,
loaded server. None may get a 5xx or hang; every error is OpenAI's (or Anthropic's) envelope;
afterwards the server still answers a normal request correctly."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server

ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
    "/api/models/load",
    "/api/models/unload",
    "/v1/messages/count_tokens",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Bodies that look almost right: each field valid-ish or replaced by arbitrary JSON, plus strays.
near_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from([DEFAULT_MODEL, "", "nope", "../../etc/passwd"]) | json_values,
    },
    optional={
        "messages": st.just([{"role": "user", "content": "hi"}]) | json_values,
        "prompt": st.sampled_from(["hi", ["a", "b"], [1, 2, 3]]) | json_values,
        "input": st.sampled_from(["hi", [1, 2]]) | json_values,
        "max_tokens": st.integers(min_value=-5, max_value=3) | st.integers(min_value=10**6) | json_values,
        "temperature": st.floats(min_value=-1, max_value=3, allow_nan=False) | json_values,
        "stream": st.booleans(),
        "stop": json_values,
        "n": st.integers(min_value=-1, max_value=3),
        "tools": json_values,
        "response_format": json_values,
        "logit_bias": json_values,
        "seed": st.integers(min_value=-(2**70), max_value=2**70),
    },
).flatmap(
    lambda body: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(lambda extra: {**extra, **body})
)
raw_bodies = st.binary(max_size=200) | st.sampled_from(
    [
        b"",
        b"\x00\x00",
        b"\xff\xfe{",
        b'{"model": "\x00"}',
        b"null",
        b"[]",
        b'"string"',
        b"{" * 500,
        json.dumps({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode(),
    ]
)


def check(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]
        assert "message" in error and ("type" in error)


@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(route=st.sampled_from(ROUTES), body=near_valid)
def test_generated_json_bodies(server: Server, route: str, body: dict[str, Any]) -> None:
    if isinstance(body.get("max_tokens"), int) and 0 < body["max_tokens"] < 10**6:
        body["max_tokens"] = min(body["max_tokens"], 3)  # valid requests stay short
    elif body.get("model") == DEFAULT_MODEL and "max_tokens" not in body:
        body["max_tokens"] = 2
    data = json.dumps(body)  # Infinity included: not JSON, and the server must say so
    with requests.post(
        server.url + route,
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
        stream=bool(body.get("stream")),
    ) as r:
        check(r) if not r.headers.get("Content-Type", "").startswith("text/event-stream") else r.content


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    route=st.sampled_from(ROUTES),
    data=raw_bodies,
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
    auth=st.sampled_from([None, "Bearer", "Bearer x", "Basic Zm9vOmJhcg==", "\u00e9"]),
)
def test_raw_bodies_and_headers(server: Server, route: str, data: bytes, content_type: str, auth: str | None) -> None:
    headers = {"Content-Type": content_type}
    if auth is not None:
        headers["Authorization"] = auth.encode("utf-8").decode("latin-1")
    check(requests.post(server.url + route, data=data, headers=headers, timeout=60))


def test_still_answers_after_the_fuzzing(server: Server) -> None:
    r = requests.post(
        f"{server.base_url}/chat/completions",
        timeout=60,
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 30,
        },
    )
    assert r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert requests.get(f"{server.url}/health", timeout=10).json()["requests_in_flight"] == 0
