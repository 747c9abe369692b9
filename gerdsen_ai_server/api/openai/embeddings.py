"""POST /v1/embeddings: the body validated and embedded (serving/embeddings.py, which says how an
embeddings request is weighed, admitted and cancelled)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.embeddings import EmbeddingRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.embeddings import embed

bp = Blueprint("openai_embeddings", __name__, url_prefix="/v1")


@bp.post("/embeddings")
def embeddings() -> Response:
    return jsonify(embed(parse_body(EmbeddingRequest, request.get_data(cache=False))).model_dump())
