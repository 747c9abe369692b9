"""API keys and their scopes in process: 401 without a valid key (OpenAI's envelope, or Anthropic's on
/v1/messages), 403 ``insufficient_scope`` when an inference key manages the server, the probes open,
the lockout after too many wrong keys, and the rate limit's 429. The rules are web/keys.py's and
web/security.py's; these tests hold the app's wiring of them (hook order, paths, envelopes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.inprocess.helpers import LLAMA, chat_body, error_of, post

INFER = "sk-inference-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef0123"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(make_app: Callable[..., Flask]) -> Flask:
    return make_app(api_keys=INFER, admin_keys=ADMIN)


@pytest.fixture
def client(keyed: Flask) -> FlaskClient:
    return keyed.test_client()


def test_no_key_is_a_401_with_the_openai_envelope(client: FlaskClient) -> None:
    r = post(client, "/v1/chat/completions", chat_body())
    error = error_of(r)
    assert r.status_code == 401 and (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/no-such-route").status_code == 401  # before routing: an unknown path tells nothing


def test_a_wrong_key_is_a_401(client: FlaskClient) -> None:
    r = client.get("/v1/models", headers=bearer("sk-wrong-0123456789abcdef"))
    assert r.status_code == 401 and "Incorrect API key" in error_of(r)["message"]


def test_messages_answer_401_in_anthropics_shape_and_take_x_api_key(client: FlaskClient) -> None:
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]}
    r = post(client, "/v1/messages/count_tokens", body)
    assert r.status_code == 401 and r.get_json()["type"] == "error", r.get_json()
    assert r.get_json()["error"]["type"] == "authentication_error"
    r = post(client, "/v1/messages/count_tokens", body, **{"x-api-key": INFER})
    assert r.status_code == 200 and r.get_json()["input_tokens"] > 0, r.get_json()


def test_an_inference_key_uses_the_api(client: FlaskClient) -> None:
    r = client.get("/v1/models", headers=bearer(INFER))
    assert r.status_code == 200 and r.get_json()["object"] == "list"
    r = client.get("/api/models", headers=bearer(INFER))  # reading the models is not management
    assert r.status_code == 200 and any(m["id"] == LLAMA for m in r.get_json()["data"])


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/models/load", {"model": LLAMA}),
        ("POST", "/api/models/unload", {"model": LLAMA}),
        ("DELETE", "/api/models/" + LLAMA, None),
        ("GET", "/api/requests", None),
        ("DELETE", "/api/requests/" + "0" * 32, None),
        ("GET", "/api/config", None),
    ],
)
def test_an_inference_key_may_not_manage(client: FlaskClient, method: str, path: str, body: Any) -> None:
    r = client.open(path, method=method, json=body, headers=bearer(INFER))
    error = error_of(r)
    assert r.status_code == 403 and (error["type"], error["code"]) == ("permission_error", "insufficient_scope"), error


def test_an_admin_key_manages(client: FlaskClient) -> None:
    r = client.get("/api/requests", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.get_json() == {"object": "list", "data": []}
    r = client.get("/api/config", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.get_json()["data"], r.get_json()
    r = client.delete("/api/requests/" + "0" * 32, headers=bearer(ADMIN))
    assert r.status_code == 404 and error_of(r)["code"] == "request_not_found"


def test_the_probes_stay_open(client: FlaskClient) -> None:
    assert client.get("/health/live").status_code == 200
    r = client.get("/health/ready")  # no default model here: not ready, but answered without a key
    assert r.status_code in (200, 503) and r.get_json()["status"] in ("ready", "not_ready"), r.get_json()


def test_too_many_wrong_keys_lock_the_address_out(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys=INFER, auth_fail_limit="3/minute").test_client()
    for _ in range(3):
        assert client.get("/v1/models", headers=bearer("sk-guess-0123456789abcdef")).status_code == 401
    r = client.get("/v1/models", headers=bearer(INFER))  # the right key too: a guess is not confirmed
    assert r.status_code == 429 and "Retry-After" in r.headers, (r.status_code, r.get_json())


def test_the_rate_limit_answers_429_with_retry_after(make_app: Callable[..., Flask]) -> None:
    client = make_app(rate_limit="2/minute").test_client()
    assert [client.get("/v1/models").status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/models")
    assert r.status_code == 429 and error_of(r)["type"] == "rate_limit_error" and "Retry-After" in r.headers
