"""Auth, size limit and rate limits on a bare Flask app (no engine): every branch, in milliseconds.
tests/api/test_security.py checks the same wiring on a real Gunicorn server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.config import is_loopback_host as is_loopback
from gerdsen_ai_server.web.keys import KeyChecker
from gerdsen_ai_server.web.security import init_security
from tests.support.apps import bare_app


def make_app(**settings: Any) -> Flask:
    app, chosen = bare_app(**settings)
    init_security(app, chosen)

    @app.route("/v1/models", methods=["GET", "POST"])
    def models():  # type: ignore[no-untyped-def]
        request.get_data()  # where Werkzeug enforces MAX_CONTENT_LENGTH
        return jsonify(object="list", data=[])

    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/openapi.json"):
        app.add_url_rule(path, path, lambda: jsonify(status="ok"))
    return app


ONE, TWO = "sk-one-0123456789abcdef", "sk-two-0123456789abcdef"  # keys need 16 characters or more
ENV, FILE_A, FILE_B = "sk-env-0123456789abcdef", "sk-file-a-0123456789abcdef", "sk-file-b-0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_checker_matches_only_whole_keys() -> None:
    checker = KeyChecker([ONE, TWO])
    assert checker.matches(ONE) and checker.matches(TWO)
    for wrong in (ONE[:-1], ONE + " ", ONE.upper(), "", ONE + "\x00", TWO + "f", "\udcff"):
        assert not checker.matches(wrong)
    assert not KeyChecker([])


def test_no_keys_means_open() -> None:
    client = make_app().test_client()
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "You didn't provide an API key"),
        (bearer("wrong"), "Incorrect API key provided."),
        (bearer(ONE[:-1]), "Incorrect API key provided."),  # a prefix of a real key
        ({"Authorization": "Basic c2stb25lOg=="}, "You didn't provide an API key"),
        ({"Authorization": "Bearer"}, "You didn't provide an API key"),
        ({"Authorization": ONE}, "You didn't provide an API key"),  # no scheme
    ],
)
def test_missing_or_wrong_key_is_401_in_the_envelope(headers: dict[str, str], message: str) -> None:
    client = make_app(api_keys=f"{ONE}, {TWO}").test_client()
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    error = r.get_json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert error["message"].startswith(message)
    assert "sk-" not in r.get_data(as_text=True)  # no key is echoed back


def test_every_configured_key_and_both_headers_work(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\n{FILE_A}\n\n  {FILE_B}  \n")
    client = make_app(api_keys=ENV, api_key_file=key_file).test_client()
    for key in (ENV, FILE_A, FILE_B):
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        assert client.post("/v1/models", headers={"x-api-key": key}).status_code == 200  # Anthropic's SDK
        assert client.get("/v1/models", headers={"Authorization": f"bearer  {key} "}).status_code == 200
    assert client.get("/v1/models", headers=bearer("# team keys")).status_code == 401


def test_probes_open_and_health_configurable() -> None:
    open_app = make_app(api_keys=ONE).test_client()
    for path in ("/health/live", "/health/ready", "/health", "/metrics", "/openapi.json"):
        assert open_app.get(path).status_code == 200, path
    assert open_app.get("/health", headers=bearer("wrong")).status_code == 200
    assert open_app.options("/v1/models").status_code == 200  # CORS preflight: no credentials

    protected = make_app(api_keys=ONE, protect_health=True).test_client()
    for path in ("/health/live", "/health/ready"):
        assert protected.get(path).status_code == 200
    for path in ("/health", "/metrics"):
        assert protected.get(path).status_code == 401
        assert protected.get(path, headers=bearer(ONE)).status_code == 200


def test_unknown_route_needs_the_key_before_it_is_a_404() -> None:
    client = make_app(api_keys=ONE).test_client()
    assert client.get("/nope").status_code == 401
    assert client.get("/nope", headers=bearer(ONE)).status_code == 404


def test_a_key_file_that_cannot_be_read_or_is_empty_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot be read"):
        make_app(api_key_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(RuntimeError, match="holds no keys"):
        make_app(api_key_file=tmp_path / "empty")


def test_public_bind_without_a_key_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gerdsen_ai_server.web.security"):
        make_app(host="127.0.0.1")
        make_app(host="0.0.0.0", api_keys=ONE)
        assert not caplog.records
        make_app(host="0.0.0.0")
    assert "NO API KEY" in caplog.text and "0.0.0.0" in caplog.text
    assert is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("::") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_body_over_the_limit_is_413_in_the_envelope() -> None:
    client = make_app(max_request_bytes=1024).test_client()
    r = client.post("/v1/models", data=b"x" * 2048, content_type="application/json")
    assert r.status_code == 413
    assert r.get_json()["error"]["code"] == "request_too_large"


def test_rate_limit_per_key_then_per_address_with_openai_headers() -> None:
    client = make_app(api_keys=f"{ONE},{TWO}", rate_limit="3/minute").test_client()
    for expected_remaining in (2, 1, 0):
        r = client.get("/v1/models", headers=bearer(ONE))
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-remaining-requests"] == str(expected_remaining)
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    r = client.get("/v1/models", headers=bearer(ONE))
    assert r.status_code == 429
    error = r.get_json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "this API key" in error["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Another key has its own budget; so has a client without a valid key (by address).
    assert client.get("/v1/models", headers=bearer(TWO)).status_code == 200
    for _ in range(3):
        assert client.get("/v1/models", headers=bearer("sk-wrong")).status_code == 401
    r = client.get("/v1/models", headers=bearer("sk-wrong"))
    assert r.status_code == 429 and "client address" in r.get_json()["error"]["message"]
    # Probes, monitoring and docs are never limited, and carry no rate headers.
    for path in ("/health/live", "/health/ready", "/health", "/metrics", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers


def test_no_rate_limit_by_default_and_a_bad_one_is_refused() -> None:
    client = make_app().test_client()
    for _ in range(5):
        assert "x-ratelimit-limit-requests" not in client.get("/v1/models").headers
    with pytest.raises(ValueError, match="couldn't parse rate limit"):
        Settings(rate_limit="lots")


def test_reset_durations_read_like_openai() -> None:
    from gerdsen_ai_server.web.rate_limits import duration

    assert [duration(s) for s in (0, 0.2, 59, 60, 61.5, 3725)] == ["0s", "1s", "59s", "1m0s", "1m2s", "1h2m5s"]
