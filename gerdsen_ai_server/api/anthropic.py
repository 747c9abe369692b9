"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens): the routes, and every error
under /v1/messages in Anthropic's shape. The translation to and from the chat path is
serving/anthropic.py's."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.anthropic import CountTokensRequest, MessagesRequest
from gerdsen_ai_server.serving.anthropic import count_tokens, error_type, message, message_events, start_message
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.sse import sse_response
from gerdsen_ai_server.web.errors import APIError, error_shape

bp = Blueprint("anthropic", __name__, url_prefix="/v1")


def anthropic_error(error: APIError) -> Response:
    response = jsonify({"type": "error", "error": {"type": error_type(error.status), "message": error.message}})
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


# Every error under /v1/messages in Anthropic's shape, wherever it comes from: the views, the auth and
# rate-limit hooks (401, 429), the shutdown drain (503), Werkzeug (404, 405, 413) or a crash (500).
bp.record_once(lambda state: error_shape(state.app, "/v1/messages", anthropic_error))


@bp.post("/messages")
def messages() -> Response:
    body = parse_body(MessagesRequest, request.get_data(cache=False))
    msg_id, started = start_message(body)
    if body.stream:
        return sse_response(message_events(msg_id, started, body))
    return jsonify(message(body, msg_id, started).model_dump())


@bp.post("/messages/count_tokens", endpoint="count_tokens")
def count_tokens_route() -> Response:
    return jsonify(count_tokens(parse_body(CountTokensRequest, request.get_data(cache=False))).model_dump())
