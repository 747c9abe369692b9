"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat path (serving/responses.py
says what is honoured, accepted or refused)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.responses import ResponsesRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.responses import final_response, response_events, start_response
from gerdsen_ai_server.serving.sse import sse_response

bp = Blueprint("openai_responses", __name__, url_prefix="/v1")


@bp.post("/responses")
def responses() -> Response:
    body = parse_body(ResponsesRequest, request.get_data(cache=False))
    run = start_response(body)
    if body.stream:
        return sse_response(response_events(run))
    return jsonify(final_response(run))
