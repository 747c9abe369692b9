"""/openapi.json (OpenAPI 3.1, built by apispec from the pydantic schemas) and /docs (Swagger UI).

The wire schemas are the pydantic models in ``schemas/``: ``models_json_schema`` turns them into
JSON Schema (2020-12, which OpenAPI 3.1 uses as is) and each becomes a component, so the spec and
the validation cannot drift apart. Swagger UI's files come from the ``flask-swagger-ui`` wheel and
are served from here: no CDN, and the page's script is a file so the CSP needs no inline script.

Component names are the models' class names. Where two wire models share one (``Usage`` in the
OpenAI and the Anthropic schemas) pydantic would name both by module path
(``gerdsen_ai_server__schemas__anthropic__Usage``), so moving a module would rename a schema in the
document and in the dashboard's generated types: ``SCHEMA_NAMES`` fixes those names instead.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from apispec import APISpec
from flask import Blueprint, Response, abort, current_app, jsonify, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import CoreModeRef, DefsRef, GenerateJsonSchema, JsonSchemaMode, models_json_schema

from gerdsen_ai_server import __version__
from gerdsen_ai_server.api.ops.openapi_operations import (
    CROSS_ORIGIN,
    EXTRA_ERRORS,
    FORBIDDEN,
    MONITORING,
    NOT_JSON,
    OK_STATUS,
    OPERATIONS,
    PROMETHEUS,
    QUERIES,
)
from gerdsen_ai_server.schemas import anthropic, health
from gerdsen_ai_server.services import services
from gerdsen_ai_server.web.keys import needs_admin

bp = Blueprint("docs", __name__)

DESCRIPTION = """\
An OpenAI-compatible (and Anthropic Messages-compatible) inference server. Point the `openai` SDK at
`http://HOST:PORT/v1`.

**Authentication.** When the server has API keys (`IMPETUS_API_KEYS` / `IMPETUS_API_KEY_FILE`), send
`Authorization: Bearer KEY` (Anthropic clients may send `x-api-key: KEY`). A missing or wrong key gets
401 with `code: invalid_api_key` and `WWW-Authenticate: Bearer`. `/health/live` and `/health/ready` are
always open; `/health` and `/metrics` unless `IMPETUS_PROTECT_HEALTH=true`; this document and `/docs` are open.
Keys are inference keys or admin keys (`IMPETUS_ADMIN_KEYS`, or `KEY admin` in the key file): management
(every POST/PUT/PATCH/DELETE under `/api/`, and `/api/config`, `/api/requests`) needs an admin key, else
403 with `code: insufficient_scope`. Twenty failed authentications a minute from one address
(`IMPETUS_AUTH_FAIL_LIMIT`) lock that address out with 429 until the window passes, right keys included.

**Bodies.** A POST/PUT/PATCH/DELETE body must be JSON, sent with `Content-Type: application/json`: any other
content type is 415 (`unsupported_media_type`). A browser's state-changing request from an origin outside
`IMPETUS_CORS_ORIGINS` is 403 (`cross_origin_request`).

**Rate limits.** With `IMPETUS_RATE_LIMIT` (e.g. `60/minute`) each key (or client address, without a
valid key) has one budget across the API. Responses carry `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` (e.g. `12s`); past the limit the
answer is 429 with `code: rate_limit_exceeded` and `Retry-After` in seconds. Probes are never limited.

**Errors.** Every failure has one shape, `{"error": {"message", "type", "param", "code"}}` (Anthropic's
own shape on `/v1/messages`): 400 invalid request (`param` names the field; `context_length_exceeded`
when prompt + `max_tokens` exceed the model's context), 401 bad key, 404 unknown model or route,
405 wrong method, 413 body over `IMPETUS_MAX_REQUEST_BYTES`, 429 rate limit, 500 server error,
503 queue full or shutting down (with `Retry-After`).

**Request ids.** Send `X-Request-ID` (letters, digits and `._:+=/-`, up to 128) or get one; every
response carries it and the server's log lines name it.
"""

ERROR_STATUSES = {
    "400": "Invalid request: a field is wrong (`param` names it) or the prompt does not fit the context.",
    "401": "Missing or wrong API key (`invalid_api_key`).",
    "404": "Unknown model or route.",
    "413": "Body larger than IMPETUS_MAX_REQUEST_BYTES (`request_too_large`).",
    "429": "Rate limit reached (`rate_limit_exceeded`); see Retry-After.",
    "500": "Server error.",
    "503": "Queue full, engine unavailable or shutting down; see Retry-After.",
}
RATE_HEADERS = {
    "x-ratelimit-limit-requests": {"description": "Requests allowed per window.", "schema": {"type": "string"}},
    "x-ratelimit-remaining-requests": {"description": "Requests left in this window.", "schema": {"type": "string"}},
    "x-ratelimit-reset-requests": {
        "description": "Time until the window resets, e.g. `12s`.",
        "schema": {"type": "string"},
    },
    "X-Request-ID": {"description": "This request's id (the client's, if valid).", "schema": {"type": "string"}},
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
# With `stream: true`. The schema describes one event, as OpenAPI 3.2's itemSchema does for SSE.
SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "Server-Sent Events: `data:` JSON chunks (and `event:` names on the Anthropic and Responses "
            "APIs); the OpenAI APIs end with `data: [DONE]`.",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
        }
    }
}


# Wire models whose class name another wire model shares: their component names, fixed (the other
# keeps the plain class name). tests/api/test_openapi.py fails on any name that spells a module path.
SCHEMA_NAMES: dict[type[BaseModel], str] = {anthropic.Usage: "AnthropicUsage"}
_FIXED = {f"{model.__module__}.{model.__qualname__}": name for model, name in SCHEMA_NAMES.items()}


class FixedNames(GenerateJsonSchema):
    """pydantic's JSON Schema, with ``SCHEMA_NAMES`` as the first choice of name for those models
    (``get_defs_ref`` is the documented place to change how definitions are named)."""

    def get_defs_ref(self, core_mode_ref: CoreModeRef) -> DefsRef:
        defs_ref = super().get_defs_ref(core_mode_ref)
        name = _FIXED.get(core_mode_ref[0].rsplit(":", 1)[0])
        if name is not None:  # choices: [Name, Name-Mode, module-qualified ...]
            choices = self._prioritized_defsref_choices[defs_ref]
            choices[:2] = [DefsRef(name), DefsRef(name + choices[1][len(choices[0]) :])]
        return defs_ref


def _response_schemas(models: list[tuple[type[BaseModel], JsonSchemaMode]]) -> tuple[dict[Any, Any], dict[str, Any]]:
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}", schema_generator=FixedNames)
    return refs, top.get("$defs", {})


def build_spec(protect_health: bool = False) -> dict[str, Any]:
    spec = APISpec(
        title="Impetus",
        version=__version__,
        openapi_version="3.1.0",
        info={"description": DESCRIPTION, "license": {"name": "See the repository"}},
    )
    spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "description": "One of the server's API keys."}
    )
    spec.components.schema("Error", ERROR_SCHEMA)
    spec.components.schema("AnthropicError", ANTHROPIC_ERROR_SCHEMA)

    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(health.Readiness, "serialization")]
    for _, _, _, _, request_model, response_model, _, _ in OPERATIONS:
        if request_model is not None:
            wanted.append((request_model, "validation"))
        if isinstance(response_model, type):
            wanted.append((response_model, "serialization"))
    refs, defs = _response_schemas(wanted)
    for name, schema in defs.items():
        spec.components.schema(name, schema)

    for path, method, tag, summary, request_model, response_model, streams, secured in OPERATIONS:
        secured = secured or (protect_health and path in MONITORING)
        anthropic_api = path.startswith("/v1/messages")
        error_ref = {"$ref": "#/components/schemas/" + ("AnthropicError" if anthropic_api else "Error")}
        body = refs[(response_model, "serialization")] if isinstance(response_model, type) else response_model
        content: dict[str, Any] = {"application/json": {"schema": body}}
        if streams:
            content.update(SSE)
        operation: dict[str, Any] = {
            "tags": [tag],
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_')}",
            "responses": {
                OK_STATUS.get((path, method), "200"): {"description": "OK", "content": content, "headers": RATE_HEADERS}
            },
        }
        for status, text in ERROR_STATUSES.items():
            if status == "401" and not secured:
                continue
            headers = {"Retry-After": {"schema": {"type": "string"}}} if status in ("429", "503") else {}
            operation["responses"][status] = {
                "description": text,
                "headers": headers,
                "content": {"application/json": {"schema": error_ref}},
            }
        admin = secured and needs_admin(method.upper(), path)
        if admin or method != "get":
            operation["responses"]["403"] = {
                "description": FORBIDDEN if admin else CROSS_ORIGIN,
                "content": {"application/json": {"schema": error_ref}},
            }
        if method != "get":
            operation["responses"]["415"] = {
                "description": NOT_JSON,
                "content": {"application/json": {"schema": error_ref}},
            }
        for status, text in EXTRA_ERRORS.get((path, method), {}).items():
            operation["responses"][status] = {
                "description": text,
                "content": {"application/json": {"schema": error_ref}},
            }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        if (path, method) in QUERIES:
            query = QUERIES[(path, method)]
            parameters += [
                {"name": name, "in": "query", "required": False, "schema": schema}
                for name, schema in query.model_json_schema()["properties"].items()
            ]
        if parameters:
            operation["parameters"] = parameters
        if request_model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(request_model, "validation")]}},
            }
        if secured:
            operation["security"] = [{"bearerAuth": []}]
        spec.path(path=path, operations={method: operation})

    readiness = {"application/json": {"schema": refs[(health.Readiness, "serialization")]}}
    spec.path(
        path="/health/ready",
        operations={
            "get": {
                "tags": ["Health"],
                "summary": "Readiness probe (always open): 503 while loading or shutting down",
                "operationId": "get_health_ready",
                "responses": {
                    "200": {"description": "Ready", "content": readiness},
                    "503": {"description": "Not ready (loading, engine down or shutting down)", "content": readiness},
                },
            }
        },
    )
    metrics: dict[str, Any] = {
        "tags": ["Monitoring"],
        "summary": "Prometheus metrics: requests, latency, TTFT, tokens, queue, memory, heat",
        "operationId": "get_metrics",
        "responses": {"200": {"description": "OK", "content": PROMETHEUS}},
    }
    if protect_health:
        metrics["security"] = [{"bearerAuth": []}]
        metrics["responses"]["401"] = {
            "description": ERROR_STATUSES["401"],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    spec.path(path="/metrics", operations={"get": metrics})
    return spec.to_dict()


@cache
def _spec(protect_health: bool) -> dict[str, Any]:
    return build_spec(protect_health)


def swagger_ui_dir() -> Path:
    import flask_swagger_ui

    return Path(flask_swagger_ui.__file__).parent / "dist"


PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Impetus API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""
INIT_JS = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""
ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png"}


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(_spec(services().settings.protect_health))


@bp.get("/docs")
def docs_page() -> Response:
    return Response(PAGE, mimetype="text/html")


@bp.get("/docs/init.js")
def docs_init() -> Response:
    return Response(INIT_JS, mimetype="text/javascript")


@bp.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        abort(404)
    response = send_from_directory(swagger_ui_dir(), name, max_age=3600)
    current_app.logger.debug("served docs asset %s", name)
    return response
