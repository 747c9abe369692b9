"""Issue 23's auth rules in-process, in milliseconds: key scopes and the key file, the minimum key
length, what counts as management, the content-type and cross-origin rules, the failed-login lockout,
masked URLs in /api/config and escaped access-log paths. tests/api/test_safe_auth.py checks the same
on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request

from gerdsen_ai_server.api.admin import config as server_config
from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.web.keys import KeyChecker, load_keys, needs_admin
from gerdsen_ai_server.web.request_log import printable
from tests.support.apps import bare_app

INFER, ADMIN = "sk-inference-0123456789", "sk-admin-0123456789abc"


def make_app(**settings: Any) -> Flask:
    app, chosen = bare_app(**settings)
    from gerdsen_ai_server.web.security import init_security

    init_security(app, chosen)

    @app.route("/v1/chat/completions", methods=["POST"])
    @app.route("/api/models/load", methods=["POST"])
    @app.route("/api/models", methods=["GET"])
    @app.route("/api/config", methods=["GET"])
    def view():  # type: ignore[no-untyped-def]
        return jsonify(ok=True, body=request.get_data(as_text=True))

    return app


def bearer(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def test_scopes_of_keys_and_the_key_file(tmp_path: Path) -> None:
    checker = KeyChecker([INFER], [ADMIN])
    assert checker.scope(INFER) == "inference" and checker.scope(ADMIN) == "admin" and checker.scope("x") is None
    assert checker.matches(INFER) and checker.matches(ADMIN) and checker.has_admin
    assert KeyChecker([ADMIN], [ADMIN]).scope(ADMIN) == "admin"  # listed as both: the wider scope
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team\n{INFER}\n  {ADMIN}   admin  \n{INFER}x inference\n")
    loaded = load_keys(Settings(default_model="", api_key_file=key_file))
    assert [loaded.scope(k) for k in (INFER, ADMIN, INFER + "x")] == ["inference", "admin", "inference"]
    key_file.write_text(f"{ADMIN} root\n")
    with pytest.raises(RuntimeError, match="line 1: expected") as info:
        load_keys(Settings(default_model="", api_key_file=key_file))
    assert ADMIN not in str(info.value)


@pytest.mark.parametrize("setting", ["api_keys", "admin_keys"])
def test_keys_shorter_than_16_characters_stop_the_start(setting: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="holds a key of 15 characters; API keys need at least 16") as info:
        make_app(**{setting: f"{INFER},sk-fifteen-char"})
    assert "sk-fifteen-char" not in str(info.value)
    key_file = tmp_path / "keys"
    key_file.write_text("sk-short admin\n")
    with pytest.raises(RuntimeError, match="IMPETUS_API_KEY_FILE .* holds a key of 8 characters"):
        make_app(api_key_file=key_file)
    make_app(**{setting: "s" * 16})  # 16 is enough


def test_management_is_every_change_under_api_and_the_admin_reads() -> None:
    for method, path in [
        ("POST", "/api/models/load"),
        ("POST", "/api/models/unload"),
        ("POST", "/api/models/pull"),
        ("DELETE", "/api/models/pulls/x"),
        ("DELETE", "/api/models/org/name"),
        ("POST", "/api/models/x/benchmark"),
        ("GET", "/api/config"),
        ("GET", "/api/requests"),
        ("DELETE", "/api/requests/r1"),
        ("PATCH", "/api/anything-new"),
    ]:
        assert needs_admin(method, path), (method, path)
    for method, path in [
        ("GET", "/api/models"),
        ("GET", "/api/models/pulls"),
        ("GET", "/api/hardware"),
        ("GET", "/api/configuration"),
        ("POST", "/v1/chat/completions"),
        ("OPTIONS", "/api/config"),
        ("HEAD", "/api/models"),
        ("GET", "/api/models/x/benchmark"),
    ]:
        assert not needs_admin(method, path), (method, path)


def test_scope_refusals_and_no_keys_open() -> None:
    client = make_app(api_keys=INFER, admin_keys=ADMIN).test_client()
    r = client.post("/api/models/load", json={}, headers=bearer(INFER))
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "insufficient_scope"
    assert r.get_json()["error"]["type"] == "permission_error"
    assert client.get("/api/config", headers=bearer(INFER)).status_code == 403
    assert client.get("/api/models", headers=bearer(INFER)).status_code == 200
    assert client.post("/api/models/load", json={}, headers=bearer(ADMIN)).status_code == 200
    assert client.post("/v1/chat/completions", json={}, headers=bearer(ADMIN)).status_code == 200
    only_inference = make_app(api_keys=INFER).test_client()  # no admin key: nobody manages over HTTP
    r = only_inference.get("/api/config", headers=bearer(INFER))
    assert r.status_code == 403 and "IMPETUS_ADMIN_KEYS" in r.get_json()["error"]["message"]
    assert make_app().test_client().post("/api/models/load", json={}).status_code == 200  # no keys: open


def test_only_json_bodies_reach_a_view() -> None:
    client = make_app().test_client()
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "text/json",
        "",
    ):
        r = client.post("/v1/chat/completions", data=b"{}", content_type=content_type or None)
        assert r.status_code == 415, content_type
        assert r.get_json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/api/models/load", data=b"", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415  # an empty form is still a form
    for content_type in (
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.impetus+json",
    ):
        assert client.post("/v1/chat/completions", data=b"{}", content_type=content_type).status_code == 200
    assert client.post("/api/models/load").status_code == 200  # no body, no type: nothing to misread
    assert client.get("/api/models", data=b"x", content_type="text/plain").status_code == 200  # reads are safe


def test_cross_origin_writes_need_an_allowed_origin() -> None:
    client = make_app().test_client()
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    r = client.post("/api/models/load", headers=evil)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "cross_origin_request"
    assert client.post("/api/models/load", headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/api/models/load", headers={"Origin": "http://localhost"}).status_code == 200  # same host
    assert client.post("/api/models/load", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post("/api/models/load", headers={"Sec-Fetch-Site": "none"}).status_code == 200
    assert client.get("/api/models", headers=evil).status_code == 200  # reads: CORS decides what a page may see
    allowed = make_app(cors_origins="https://evil.example").test_client()
    assert allowed.post("/api/models/load", headers=evil).status_code == 200


def test_failed_logins_lock_the_address_out_right_key_included() -> None:
    client = make_app(api_keys=INFER, auth_fail_limit="3/minute").test_client()
    assert [client.get("/nope", headers=bearer(f"sk-guess-{n}")).status_code for n in range(3)] == [401] * 3
    r = client.get("/nope", headers=bearer("sk-guess-4"))
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    assert client.get("/api/models", headers=bearer(INFER)).status_code == 429
    other = {"REMOTE_ADDR": "10.1.2.3"}
    assert client.get("/api/models", headers=bearer(INFER), environ_base=other).status_code == 200
    unlimited = make_app(api_keys=INFER, auth_fail_limit="").test_client()
    assert {unlimited.get("/nope", headers=bearer("x")).status_code for _ in range(30)} == {401}


def test_config_masks_passwords_in_urls() -> None:
    mask = server_config.MASK
    cases = {
        "redis://h/0?password=hunter2": f"redis://h/0?password={mask}",
        "redis://h:6379/0?db=1&Password=hunter2&ssl=true": f"redis://h:6379/0?db=1&Password={mask}&ssl=true",
        "rediss://:hunter2@h:6380/0": f"rediss://:{mask}@h:6380/0",
        "https://hunter2@hub.example/x?sig=hunter2&access_token=hunter2": f"https://{mask}@hub.example/x?sig={mask}&access_token={mask}",
        "redis://user:hunter2@[::1]:6379": f"redis://user:{mask}@[::1]:6379",
        "redis://h:notaport/0?password=hunter2": mask,  # does not parse: masked whole
        "http://host:80/x?q=1": "http://host:80/x?q=1",
    }
    for url, shown in cases.items():
        assert server_config.shown("redis_url", url) == shown, url
    app, _ = bare_app(redis_url="redis://cache:6379/0?password=hunter2")
    app.register_blueprint(server_config.bp)
    text = app.test_client().get("/api/config").get_data(as_text=True)
    assert "hunter2" not in text and f"password={mask}" in text


def test_access_log_paths_are_escaped() -> None:
    assert printable("/v1/x\ny\r\x00\x1b[31m\x7f\x85\u2028z") == "/v1/x\\x0ay\\x0d\\x00\\x1b[31m\\x7f\\x85\\u2028z"
    assert printable("/v1/caf\u00e9/\u4e2d") == "/v1/caf\u00e9/\u4e2d"  # printable text stays as it is
