"""The dashboard's files at /, beside an API that keeps its own paths, 404s and 405s."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask, jsonify

from gerdsen_ai_server.api.ops.dashboard import init_dashboard
from tests.support.apps import bare_app

INDEX = '<!doctype html><div id="root"></div><script type="module" src="/assets/index-abc.js"></script>'


def make_app(dist: Path) -> Flask:
    app, _ = bare_app()
    init_dashboard(app, dist)

    @app.post("/v1/chat/completions")
    def chat():  # type: ignore[no-untyped-def]
        return jsonify(ok=True)

    @app.get("/api/models")
    def models():  # type: ignore[no-untyped-def]
        return jsonify(data=[])

    return app


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text(INDEX)
    (tmp_path / "assets" / "index-abc.js").write_text("console.log('hi')")
    (tmp_path / "favicon.svg").write_text("<svg/>")
    return tmp_path


def test_index_and_assets(dist: Path) -> None:
    client = make_app(dist).test_client()
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html" and b'id="root"' in r.data
    assert r.headers["Cache-Control"] == "no-cache"
    r = client.get("/assets/index-abc.js")
    assert r.status_code == 200 and "javascript" in r.mimetype and "max-age=31536000" in r.headers["Cache-Control"]
    assert client.get("/favicon.svg").mimetype == "image/svg+xml"
    assert client.head("/").status_code == 200


def test_spa_fallback_for_page_paths(dist: Path) -> None:
    client = make_app(dist).test_client()
    for path in ("/models", "/playground", "/requests/abc"):
        r = client.get(path)
        assert r.status_code == 200 and b'id="root"' in r.data, path


def test_missing_files_are_json_404s_not_html(dist: Path) -> None:
    client = make_app(dist).test_client()
    for path in ("/assets/gone.js", "/favicon.ico", "/../etc/passwd.txt"):
        r = client.get(path)
        assert r.status_code == 404 and r.json["error"]["code"] == "not_found", path


def test_the_api_keeps_its_paths_404s_and_405s(dist: Path) -> None:
    client = make_app(dist).test_client()
    assert client.get("/api/models").json == {"data": []}
    for path in ("/v1/nothing", "/api/nothing", "/health/nothing", "/metrics/x", "/docs/x", "/socket.io/x"):
        r = client.get(path)
        assert r.status_code == 404 and r.is_json and set(r.json["error"]) == {"message", "type", "param", "code"}, path
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"
    assert client.post("/models").status_code in (404, 405)  # no POST to a page


def test_no_build_is_a_clear_json_404(tmp_path: Path) -> None:
    client = make_app(tmp_path / "missing").test_client()
    for path in ("/", "/models"):
        r = client.get(path)
        assert r.status_code == 404 and r.json["error"]["code"] == "dashboard_not_built"
        assert "make dashboard" in r.json["error"]["message"]
    assert client.get("/api/models").status_code == 200
