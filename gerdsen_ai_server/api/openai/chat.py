"""POST /v1/chat/completions: the body validated, the chat started (serving/chat.py), the answer
as JSON or as Server-Sent Events."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.openai import ChatCompletionRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.chat import chat_chunks, chat_completion, chat_meta, start_chat
from gerdsen_ai_server.serving.sse import event_stream

bp = Blueprint("openai_chat", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = parse_body(ChatCompletionRequest, request.get_data(cache=False))
    started = start_chat(body, "messages")
    meta = chat_meta(started)
    if body.stream:
        return event_stream(chat_chunks(body, started, meta), started.streams)
    return jsonify(chat_completion(body, started, meta).model_dump())
