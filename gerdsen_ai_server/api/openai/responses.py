"""POST /v1/responses: OpenAI's Responses API over the chat path (serving/responses.py says what is
honoured, accepted or refused); GET and DELETE /v1/responses/<id>: responses stored with
``store: true`` (serving/response_store.py), each readable by the API key that made it or an admin's."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.responses import ResponsesRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.response_store import Owner, delete, retrieve
from gerdsen_ai_server.serving.responses import final_response, response_events, start_response
from gerdsen_ai_server.serving.sse import sse_response
from gerdsen_ai_server.web.keys import ADMIN

bp = Blueprint("openai_responses", __name__, url_prefix="/v1")


def owner() -> Owner:
    """The key this request presented (web/security.py ``identify``), the owner of what it stores."""
    return Owner(g.get("api_key_id"), g.get("api_key_scope") == ADMIN)


def no_query() -> None:
    """OpenAI's retrieve takes ``include``, ``stream`` and ``starting_after``: a stored response is
    returned whole, never replayed as a stream, so any of them is a 400 rather than ignored."""
    for name in request.args:
        raise APIError(400, f"'{name}' is not supported here.", param=name[:64], code="unsupported_parameter")


@bp.post("/responses")
def responses() -> Response:
    body = parse_body(ResponsesRequest, request.get_data(cache=False))
    run = start_response(body, owner())
    if body.stream:
        return sse_response(response_events(run))
    return jsonify(final_response(run))


@bp.get("/responses/<response_id>")
def get_response(response_id: str) -> Response:
    no_query()
    return jsonify(retrieve(response_id, owner()))


@bp.delete("/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    no_query()
    return jsonify(delete(response_id, owner()).model_dump())
