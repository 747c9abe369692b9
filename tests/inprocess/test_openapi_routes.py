"""/openapi.json against the app's own routes, in process: every route the app serves is documented
with the methods it answers, and every documented operation is a route (the document is hand-listed
in api/ops/docs.py, so a new or moved route must be listed there too: this is what fails if not)."""

from __future__ import annotations

import re

from flask import Flask
from flask.testing import FlaskClient

# The document's own pages: what documents the API is not part of it.
SELF = {"/openapi.json", "/docs", "/docs/init.js", "/docs/{name}"}
IGNORED_METHODS = {"HEAD", "OPTIONS"}


def routed(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every rule of the app: ``<path:model_id>`` as ``{model_id}``."""
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        if path in SELF or path.startswith("/static"):
            continue
        found |= {(path, method.lower()) for method in (rule.methods or set()) - IGNORED_METHODS}
    return found


def documented(client: FlaskClient) -> set[tuple[str, str]]:
    spec = client.get("/openapi.json").get_json()
    return {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }


def test_every_route_is_documented_and_every_operation_routed(app: Flask, client: FlaskClient) -> None:
    served, listed = routed(app), documented(client)
    assert served - listed == set(), "routes the document leaves out (api/ops/docs.py OPERATIONS)"
    assert listed - served == set(), "operations the app does not serve"


def test_the_document_describes_the_api(client: FlaskClient) -> None:
    r = client.get("/openapi.json")
    spec = r.get_json()
    assert r.status_code == 200 and spec["openapi"] == "3.1.0"
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearerAuth": []}] and {"200", "400", "401", "413", "429", "503"} <= set(
        chat["responses"]
    )
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert "security" not in spec["paths"]["/health/live"]["get"]


def test_the_docs_page_is_served(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    assert "<script>" not in page.get_data(as_text=True)  # no inline script: the CSP allows 'self' only
