"""Everything a public deployment turns on, on one real Gunicorn server: keys from the environment and
a key file (the official SDKs with a key, 401 in the envelope without one, probes open), a rate limit
hit and recovered, CORS for one origin, security headers, request ids and JSON logs that hold no
prompt and no key. (Every branch, in-process: tests/unit/test_security_hooks.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

ENV_KEY = "sk-impetus-env-0123456789"
FILE_KEY = "sk-impetus-file-abcdef"
RATE_KEY = "sk-impetus-rate-0123456789"  # only the rate-limit test spends this key's budget
ORIGIN = "https://app.example"
AUTH = {"Authorization": f"Bearer {FILE_KEY}"}
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("secured")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# one key per line\n{FILE_KEY}\n")
    srv = start_server(
        tmp,
        IMPETUS_API_KEYS=f"{ENV_KEY},{RATE_KEY}",
        IMPETUS_API_KEY_FILE=str(key_file),
        IMPETUS_RATE_LIMIT="5/2 second",
        IMPETUS_CORS_ORIGINS=ORIGIN,
        IMPETUS_LOG_FORMAT="json",
    )
    yield srv
    stop_server(srv, wait=False)


def test_requests_without_a_valid_key_get_401(secured: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {ENV_KEY[:-1]}"}):
        r = requests.post(f"{secured.base_url}/chat/completions", json=CHAT, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_probes_stay_open(secured: Server) -> None:
    for path in ("/health/live", "/health/ready", "/health"):
        assert requests.get(secured.url + path, timeout=10).status_code == 200


def test_openai_sdk_with_a_key_from_the_environment_or_the_file(secured: Server) -> None:
    from openai import AuthenticationError, OpenAI

    for key in (ENV_KEY, FILE_KEY):
        client = OpenAI(base_url=secured.base_url, api_key=key, max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content is not None
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=secured.base_url, api_key="sk-wrong", max_retries=0).models.list()


def test_anthropic_sdk_sends_its_key_as_x_api_key(secured: Server) -> None:
    from anthropic import Anthropic

    client = Anthropic(base_url=secured.url, api_key=ENV_KEY, max_retries=0, timeout=60)
    reply = client.messages.create(model=DEFAULT_MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.output_tokens >= 1


def test_rate_limit_is_hit_then_recovers(secured: Server) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {RATE_KEY}"
    url = f"{secured.base_url}/models"
    statuses = [session.get(url, timeout=10) for _ in range(7)]
    assert [r.status_code for r in statuses].count(429) >= 1  # 5 per window; a window may turn over once
    limited = next(r for r in statuses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["x-ratelimit-limit-requests"] == "5"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    wait = int(limited.headers["Retry-After"])
    assert 1 <= wait <= 2
    assert requests.get(secured.url + "/health/ready", timeout=10).status_code == 200  # probes are never limited
    time.sleep(wait)
    r = session.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "4"


def test_security_headers_on_every_response(secured: Server) -> None:
    responses = [
        requests.get(secured.url + "/health/live", timeout=10),
        requests.get(f"{secured.base_url}/models", timeout=10),  # 401
        requests.get(f"{secured.base_url}/nope", headers=AUTH, timeout=10),  # 404
        requests.post(
            f"{secured.base_url}/chat/completions",
            data=b"{",
            timeout=10,
            headers={**AUTH, "Content-Type": "application/json"},
        ),  # 400
    ]
    assert [r.status_code for r in responses] == [200, 401, 404, 400]
    for r in responses:
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def test_cors_answers_only_the_configured_origin(secured: Server) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang",
    }
    r = requests.options(f"{secured.base_url}/chat/completions", headers=preflight, timeout=10)
    assert r.status_code == 200  # no key needed for a preflight
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    r = requests.get(f"{secured.base_url}/models", headers={**AUTH, "Origin": ORIGIN}, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = r.headers["Access-Control-Expose-Headers"].lower()
    assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
    r = requests.get(f"{secured.base_url}/models", headers={**AUTH, "Origin": "https://evil.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers


def test_request_ids_are_honoured_or_made_and_logged_without_prompts(secured: Server) -> None:
    given = "trace-7f3a.b_9:1"
    secret_prompt = "zebra-marmalade-42 is my secret prompt"
    body = {**CHAT, "messages": [{"role": "user", "content": secret_prompt}]}
    r = requests.post(
        f"{secured.base_url}/chat/completions", json=body, timeout=60, headers={**AUTH, "X-Request-ID": given}
    )
    assert r.status_code == 200 and r.headers["X-Request-ID"] == given
    made = requests.get(
        f"{secured.base_url}/models", headers={**AUTH, "X-Request-ID": "no spaces allowed"}, timeout=10
    ).headers["X-Request-ID"]
    assert len(made) == 32 and made != "no spaces allowed"
    assert requests.get(f"{secured.base_url}/models", timeout=10).headers["X-Request-ID"]  # on a 401 too

    deadline = time.monotonic() + 10  # the line is written when the response closes
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in secured.log().splitlines() if line.startswith("{")]
        ours = [line for line in lines if line.get("request_id") == given and line["logger"] == "impetus.access"]
        if ours:
            break
        time.sleep(0.2)
    assert ours, secured.log()[-2000:]
    line = ours[0]
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert line["duration_ms"] > 0 and line["level"] == "info" and len(line["key_id"]) == 16
    assert any(entry["logger"].startswith("gunicorn") for entry in lines)  # Gunicorn's own lines are JSON too
    log = secured.log()
    assert "zebra-marmalade" not in log
    assert ENV_KEY not in log and FILE_KEY not in log and RATE_KEY not in log


# ---- behind a load balancer: IMPETUS_TRUSTED_PROXIES ---------------------------------------------


def limited_server(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Server:
    # No model (up in seconds): /v1/models and count_tokens for a model that is not there answer
    # without one, and every request spends the client address's budget.
    return start_server(
        tmp_path_factory.mktemp(name),
        wait_ready=False,
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_AUTOLOAD="false",
        IMPETUS_RATE_LIMIT="3/minute",
        IMPETUS_LOG_FORMAT="json",
        **env,
    )


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = limited_server(tmp_path_factory, "proxied", IMPETUS_TRUSTED_PROXIES="1")
    yield srv
    stop_server(srv, wait=False)


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = limited_server(tmp_path_factory, "direct")
    yield srv
    stop_server(srv, wait=False)


def spend(server: Server, forwarded_for: str, times: int) -> list[requests.Response]:
    return [
        requests.get(f"{server.base_url}/models", headers={"X-Forwarded-For": forwarded_for}, timeout=10)
        for _ in range(times)
    ]


def test_with_trusted_proxies_x_forwarded_for_picks_the_bucket(behind_proxy: Server) -> None:
    first = spend(behind_proxy, "203.0.113.7", 4)
    assert [r.status_code for r in first] == [200, 200, 200, 429]
    assert first[-1].json()["error"]["code"] == "rate_limit_exceeded"
    # Another client behind the same balancer has its own budget.
    other = spend(behind_proxy, "203.0.113.8", 1)[0]
    assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == "2"
    # Only the hop the proxy appended counts: a client cannot choose its bucket by sending the header itself.
    spoofed = spend(behind_proxy, "198.51.100.1, 203.0.113.7", 1)[0]
    assert spoofed.status_code == 429
    deadline = time.monotonic() + 10  # the access log names the client, not the balancer
    remotes: set[str] = set()
    while "203.0.113.8" not in remotes and time.monotonic() < deadline:
        lines = [json.loads(line) for line in behind_proxy.log().splitlines() if line.startswith("{")]
        remotes = {
            line["remote"] for line in lines if line.get("logger") == "impetus.access" and line["path"] == "/v1/models"
        }
        time.sleep(0.2)
    assert {"203.0.113.7", "203.0.113.8"} <= remotes and "127.0.0.1" not in remotes, remotes


def test_without_trusted_proxies_x_forwarded_for_is_ignored(direct: Server) -> None:
    statuses = [
        r.status_code
        for ip in ("203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4")
        for r in spend(direct, ip, 1)
    ]
    assert statuses == [200, 200, 200, 429]  # one bucket: the connection's address


def test_anthropic_rate_limit_error_shape(behind_proxy: Server) -> None:
    from anthropic import Anthropic, NotFoundError, RateLimitError

    client = Anthropic(
        base_url=behind_proxy.url,
        api_key="unused",
        max_retries=0,
        timeout=30,
        default_headers={"X-Forwarded-For": "203.0.113.50"},
    )
    for _ in range(3):
        with pytest.raises(NotFoundError):
            client.messages.count_tokens(model="absent", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(RateLimitError) as info:
        client.messages.count_tokens(model="absent", messages=[{"role": "user", "content": "hi"}])
    body = info.value.body
    assert (
        body["type"] == "error"
        and body["error"]["type"] == "rate_limit_error"
        and set(body["error"]) == {"type", "message"}
    )
    assert "Rate limit reached" in body["error"]["message"]
    assert 1 <= int(info.value.response.headers["Retry-After"]) <= 60
    assert info.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_socketio_generate_spends_the_same_rate_limit_budget(behind_proxy: Server) -> None:
    import socketio

    address = "203.0.113.77"
    assert [r.status_code for r in spend(behind_proxy, address, 1)] == [200]
    client = socketio.Client(reconnection=False)  # the Engine.IO handshake spends one too (guard.py)
    client.connect(behind_proxy.url, transports=["websocket"], headers={"X-Forwarded-For": address}, wait_timeout=30)
    try:
        chat = {"model": "absent", "messages": [{"role": "user", "content": "hi"}]}
        first = client.call("generate", chat, timeout=30)  # the budget's last request: answered (no such model)
        assert first["error"]["code"] == "model_not_found"
        limited = client.call("generate", chat, timeout=30)
        assert limited["error"]["code"] == "rate_limit_exceeded" and limited["error"]["type"] == "rate_limit_error"
        assert "this client address" in limited["error"]["message"]
    finally:
        client.disconnect()
    assert spend(behind_proxy, address, 1)[0].status_code == 429  # and the HTTP API sees the same bucket


def test_protect_health_puts_health_and_metrics_behind_the_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(
        tmp_path_factory.mktemp("protected"),
        wait_ready=False,
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_API_KEYS=ENV_KEY,
        IMPETUS_PROTECT_HEALTH="true",
    )
    try:
        for path in ("/health", "/metrics"):
            r = requests.get(srv.url + path, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert (
                requests.get(srv.url + path, headers={"Authorization": f"Bearer {ENV_KEY}"}, timeout=10).status_code
                == 200
            ), path
        assert requests.get(srv.url + "/health/live", timeout=10).status_code == 200  # probes stay open
        assert requests.get(srv.url + "/health/ready", timeout=10).status_code == 503  # no model: open, not ready
        spec = requests.get(srv.url + "/openapi.json", timeout=10).json()  # and the document says so
        assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearerAuth": []}]
    finally:
        stop_server(srv, wait=False)


def test_failed_socketio_logins_spend_the_address_budget(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Guessing keys over the Socket.IO handshake is limited like guessing them over HTTP."""
    import socketio

    srv = start_server(
        tmp_path_factory.mktemp("socket-logins"),
        wait_ready=False,
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_API_KEYS=ENV_KEY,
        IMPETUS_RATE_LIMIT="3/minute",
    )
    try:
        refusals = []
        for guess in ("sk-a", "sk-b", "sk-c", "sk-d"):  # the key is asked for in the handshake (guard.py)
            client = socketio.Client(reconnection=False)
            client.on("connect_error", refusals.append)
            with pytest.raises(socketio.exceptions.ConnectionError):  # over polling the envelope comes through
                client.connect(
                    srv.url, transports=["polling"], headers={"Authorization": f"Bearer {guess}"}, wait_timeout=30
                )
        codes = [r["error"]["code"] for r in refusals]
        assert codes == ["invalid_api_key"] * 3 + ["rate_limit_exceeded"], refusals
        assert refusals[-1]["error"]["message"].startswith("Rate limit reached for this client address")
        r = requests.get(f"{srv.base_url}/models", timeout=10)  # the same bucket as HTTP without a key
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        good = socketio.Client(reconnection=False)  # a right key is never refused for the address's failures
        good.connect(
            srv.url,
            transports=["websocket"],
            headers={"Authorization": f"Bearer {ENV_KEY}"},
            auth={"rooms": []},
            wait_timeout=30,
        )
        assert good.connected
        good.disconnect()
    finally:
        stop_server(srv, wait=False)
