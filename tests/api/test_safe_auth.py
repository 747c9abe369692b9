"""Issue 23, items 4 (content type), 6 (admin scope), 7 (key guessing), 8/9 (log lines, /health): on one
real keyed Gunicorn server (inference and admin keys, a tiny model to load, one trusted proxy hop so
that each test spends its own client address's failed-login budget), plus the keyless session server
for the loopback default and the pinned default model. (The rules' branches, in-process:
tests/unit/test_safe_auth_hooks.py.)"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

INFER = "sk-inference-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef0123"
TINY = "tiny-safe"
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def auth(key: str, address: str = "198.51.100.1") -> dict[str, str]:
    """The key, from a client address of the test's choosing (the server trusts one proxy hop)."""
    return {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.support.tiny_models import build_tiny_llama

    tmp = tmp_path_factory.mktemp("safe-auth")
    default = default_model_folder()
    models = tmp / "models"
    build_tiny_llama(models / TINY, default)
    # No default model: up in seconds; the tiny one is loaded on demand.
    srv = start_server(
        tmp,
        wait_ready=False,
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_API_KEYS=INFER,
        IMPETUS_ADMIN_KEYS=ADMIN,
        IMPETUS_TRUSTED_PROXIES="1",
        IMPETUS_LOG_FORMAT="text",
    )
    yield srv
    stop_server(srv)  # waits: its models folder goes next
    shutil.rmtree(models, ignore_errors=True)


def states(srv: Server) -> dict[str, str]:
    data = requests.get(f"{srv.url}/api/models", headers=auth(ADMIN), timeout=30).json()["data"]
    return {m["id"]: m["state"] for m in data}


def unload_tiny(srv: Server) -> None:
    requests.post(f"{srv.url}/api/models/unload", json={"model": TINY}, headers=auth(ADMIN), timeout=60)
    assert states(srv)[TINY] == "local"


# ---- item 4: JSON endpoints take JSON only --------------------------------------------------------


def test_text_plain_and_form_posts_get_415_and_load_nothing(keyed: Server) -> None:
    """A web page can post text/plain, forms and multipart anywhere without a preflight: today they ran
    chats and loads. Each is 415 before a view runs: the tiny model is never autoloaded."""
    import json

    unload_tiny(keyed)
    body = json.dumps(CHAT)
    for path, data in (("/v1/chat/completions", body), ("/api/models/load", json.dumps({"model": TINY}))):
        for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
            headers = auth(ADMIN)
            if content_type is not None:
                headers["Content-Type"] = content_type
            r = requests.post(keyed.url + path, data=data.encode(), headers=headers, timeout=60)
            assert r.status_code == 415, (path, content_type, r.status_code, r.text[:200])
            error = r.json()["error"]
            assert error["code"] == "unsupported_media_type" and error["type"] == "invalid_request_error"
        r = requests.post(keyed.url + path, files={"f": ("x.json", data)}, headers=auth(ADMIN), timeout=60)
        assert r.status_code == 415  # multipart/form-data
    assert states(keyed)[TINY] == "local"  # nothing was loaded, so nothing generated
    # JSON, with a charset or as a +json type, goes through.
    r = requests.post(
        keyed.url + "/v1/chat/completions",
        data=body.encode(),
        timeout=120,
        headers={**auth(INFER), "Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text[:300]
    r = requests.post(
        keyed.url + "/api/models/unload",
        data=json.dumps({"model": TINY}).encode(),
        timeout=60,
        headers={**auth(ADMIN), "Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 200, r.text[:300]


# ---- item 6: admin scope ------------------------------------------------------------------------

MANAGEMENT = [
    ("POST", "/api/models/load", {"model": TINY}),
    ("POST", "/api/models/unload", {"model": TINY}),
    ("POST", "/api/models/pull", {"model": "org/some-model"}),
    ("DELETE", "/api/models/pulls/no-such-pull", None),
    ("DELETE", f"/api/models/{TINY}", None),
    ("POST", f"/api/models/{TINY}/benchmark", {"prompt_tokens": 8, "max_tokens": 2}),
    ("GET", "/api/config", None),
    ("GET", "/api/requests", None),
    ("DELETE", "/api/requests/no-such-request", None),
    ("PUT", "/api/models/a-route-added-later", {}),  # management by construction, routed or not
]


def test_an_inference_key_gets_403_on_every_management_route(keyed: Server) -> None:
    for method, path, body in MANAGEMENT:
        r = requests.request(method, keyed.url + path, json=body, headers=auth(INFER), timeout=60)
        assert r.status_code == 403, (method, path, r.status_code, r.text[:200])
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("permission_error", "insufficient_scope"), error
        assert "admin key" in error["message"]
    assert TINY in requests.get(f"{keyed.url}/api/models", headers=auth(INFER), timeout=30).text  # reads stay
    assert requests.get(f"{keyed.url}/api/models/pulls", headers=auth(INFER), timeout=30).status_code == 200
    r = requests.post(f"{keyed.base_url}/chat/completions", json=CHAT, headers=auth(INFER), timeout=120)
    assert r.status_code == 200  # and inference, its model loaded on demand
    unload_tiny(keyed)


def test_an_admin_key_may_manage_and_infer(keyed: Server) -> None:
    config = requests.get(f"{keyed.url}/api/config", headers=auth(ADMIN), timeout=30)
    assert config.status_code == 200
    keys = {e["name"]: e["value"] for e in config.json()["data"]}
    assert keys["api_keys"] == "******** (1 key)" and keys["admin_keys"] == "******** (1 key)"
    assert INFER not in config.text and ADMIN not in config.text
    r = requests.post(f"{keyed.url}/api/models/load", json={"model": TINY}, headers=auth(ADMIN), timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "resident"
    r = requests.delete(f"{keyed.url}/api/models/pulls/no-such-pull", headers=auth(ADMIN), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "pull_not_found"  # reached the route
    r = requests.post(f"{keyed.base_url}/chat/completions", json=CHAT, headers=auth(ADMIN), timeout=120)
    assert r.status_code == 200
    unload_tiny(keyed)


def test_without_keys_the_loopback_user_may_manage(server: Server) -> None:
    assert requests.get(f"{server.url}/api/config", timeout=30).status_code == 200
    r = requests.post(f"{server.url}/api/models/unload", json={"model": "not-loaded-anywhere"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_pinned_default_model_cannot_be_unloaded_or_deleted(server: Server) -> None:
    r = requests.post(f"{server.url}/api/models/unload", json={"model": DEFAULT_MODEL}, timeout=60)
    assert r.status_code == 409, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "model_pinned" and "default model" in error["message"]
    r = requests.delete(f"{server.url}/api/models/{DEFAULT_MODEL}", timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_pinned", r.text[:300]
    assert requests.get(f"{server.url}/health/ready", timeout=10).status_code == 200  # still serving
    listed = {m["id"]: m for m in requests.get(f"{server.url}/api/models", timeout=30).json()["data"]}
    assert listed[DEFAULT_MODEL]["state"] == "resident"


def test_a_cross_site_page_cannot_post_without_a_body(server: Server) -> None:
    """No body, so no content type to refuse: `fetch(url, {method: "POST", mode: "no-cors"})` from any
    page reached a benchmark run of the default model. Browsers say where a request comes from."""
    url = f"{server.url}/api/models/{DEFAULT_MODEL}/benchmark"
    for headers in (
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:9999"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
    ):
        r = requests.post(url, headers=headers, timeout=60)
        assert r.status_code == 403, (headers, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "cross_origin_request"
    # The page itself (same origin), and clients that are not browsers, still reach the routes.
    unload = f"{server.url}/api/models/unload"
    host = server.url.removeprefix("http://")
    for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": server.url}, {"Origin": f"http://{host}"}, {}):
        r = requests.post(unload, json={"model": "not-loaded-anywhere"}, headers=headers, timeout=30)
        assert r.status_code == 404, (headers, r.status_code, r.text[:200])


# ---- item 7: key guessing --------------------------------------------------------------------


def test_wrong_keys_on_an_unrouted_path_are_401_then_429(keyed: Server) -> None:
    guesser = "203.0.113.40"
    statuses = []
    for n in range(40):
        r = requests.get(
            f"{keyed.url}/v1/no-such-route", headers=auth(f"sk-guess-{n:04d}-0123456789", guesser), timeout=10
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[:20] == [401] * 20 and statuses[-1] == 429 and len(statuses) < 40, statuses
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["Retry-After"]) <= 60
    # Locked out: a right key from that address is refused too (else 429 vs 200 would still answer guesses)...
    r = requests.get(f"{keyed.base_url}/models", headers=auth(INFER, guesser), timeout=10)
    assert r.status_code == 429
    r = requests.get(f"{keyed.base_url}/models", headers={"X-Forwarded-For": guesser}, timeout=10)
    assert r.status_code == 429  # no key at all: the same
    # ...while probes stay open, and another address is not affected.
    r = requests.get(f"{keyed.url}/health/live", headers={"X-Forwarded-For": guesser}, timeout=10)
    assert r.status_code == 200
    assert requests.get(f"{keyed.base_url}/models", headers=auth(INFER, "203.0.113.41"), timeout=10).status_code == 200


def test_an_unknown_path_does_not_tell_a_valid_key(keyed: Server) -> None:
    address = "203.0.113.50"
    wrong = requests.get(
        f"{keyed.url}/api/nothing-here", headers=auth("sk-wrong-0123456789abcdef", address), timeout=10
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    right = requests.get(f"{keyed.url}/api/nothing-here", headers=auth(INFER, address), timeout=10)
    assert right.status_code == 404


def test_a_short_key_stops_the_start(tmp_path: Path) -> None:
    short = "sk-short-key"  # 12 characters
    with pytest.raises(RuntimeError) as info:
        srv = start_server(tmp_path, wait_ready=False, IMPETUS_DEFAULT_MODEL="", IMPETUS_API_KEYS=short)
        stop_server(srv)  # started after all: the assertion below says why
    message = str(info.value)
    assert "server exited" in message, message[-2000:]
    assert "IMPETUS_API_KEYS holds a key of 12 characters" in message and "at least 16" in message, message[-2000:]
    assert short not in message.split("\n", 1)[1]  # the key itself is never logged


# ---- items 8 and 9: log lines, /health -----------------------------------------------------------


def test_a_newline_in_the_path_cannot_forge_an_access_log_line(keyed: Server) -> None:
    forged = "2030-01-01 00:00:00,000 INFO impetus.access [forged]: GET /api/config 200 1.0ms"
    path = "/v1/nothing%0A" + requests.utils.quote(forged) + "%0D%E2%80%A8x"
    r = requests.get(keyed.url + path, headers=auth(INFER), timeout=10)
    assert r.status_code == 404
    deadline = time.monotonic() + 10  # the line is written when the response closes
    while "\\x0a2030-01-01" not in keyed.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = keyed.log()
    assert "GET /v1/nothing\\x0a2030-01-01 00:00:00,000 INFO" in log and "\\x0d\\u2028x 404" in log, log[-2000:]
    assert not any(line.startswith("2030-01-01") for line in log.splitlines())


def test_anonymous_health_shows_no_path_or_pid(keyed: Server) -> None:
    requests.post(f"{keyed.url}/api/models/load", json={"model": TINY}, headers=auth(ADMIN), timeout=120)
    try:
        anonymous = requests.get(f"{keyed.url}/health", timeout=10)
        assert anonymous.status_code == 200
        body = anonymous.json()
        assert body["pid"] is None and [m["path"] for m in body["models"]] == [None]
        assert str(keyed.log_path.parent) not in anonymous.text and "/models/" not in anonymous.text
        keyed_body = requests.get(f"{keyed.url}/health", headers=auth(INFER), timeout=10).json()
        assert isinstance(keyed_body["pid"], int) and keyed_body["models"][0]["path"].endswith(TINY)
    finally:
        unload_tiny(keyed)
