"""POST /v1/completions: the body validated, the prompts submitted (serving/completions.py), the
answer as JSON or as Server-Sent Events."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.openai import CompletionRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.completions import completion, completion_chunks, start_completion
from gerdsen_ai_server.serving.sse import event_stream

bp = Blueprint("openai_completions", __name__, url_prefix="/v1")


@bp.post("/completions")
def completions() -> Response:
    body = parse_body(CompletionRequest, request.get_data(cache=False))
    started = start_completion(body)
    if body.stream:
        return event_stream(completion_chunks(started), started.streams)
    return jsonify(completion(started).model_dump())
