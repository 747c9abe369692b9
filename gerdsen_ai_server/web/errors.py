"""One OpenAI-style error envelope for every failure, Flask's own 404/405/413/500 included."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, has_request_context, jsonify, request
from flask.sansio.app import App
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from gerdsen_ai_server.errors import APIError, error_body
from gerdsen_ai_server.services import services

__all__ = ["APIError", "error_body", "error_response", "error_shape", "register_error_handlers"]

log = logging.getLogger(__name__)

Renderer = Callable[[APIError], Response]


def error_shape(app: App, path_prefix: str, render: Renderer) -> None:
    """Routes under ``path_prefix`` answer errors in their API's own shape (Anthropic's on
    /v1/messages): every error, whether a view raised it or a hook did (401, 429, 503 while
    draining) or Werkzeug did (404, 405, 413), goes through ``render`` instead of the envelope."""
    services(app).error_shapes[path_prefix] = render


def _renderer() -> Renderer | None:
    if not has_request_context():
        return None
    path = request.path
    for prefix, render in services().error_shapes.items():
        if path == prefix or path.startswith(prefix + "/"):
            return render
    return None


def error_response(error: APIError) -> Response:
    render = _renderer()
    if render is not None:
        return render(error)
    response = jsonify(error.envelope())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, with ``param`` naming the field as OpenAI does."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith(("function-", "literal"))]
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    message = f"Invalid value for '{param}': {first['msg']}" if param else first["msg"]
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return APIError(400, message, param=param, code=code)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> Response:
        return error_response(exc)

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        error = APIError(status, exc.description or exc.name, code=codes.get(status))
        response = error_response(error)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(
            APIError(500, "The server had an error while processing your request.", code="internal_error")
        )
