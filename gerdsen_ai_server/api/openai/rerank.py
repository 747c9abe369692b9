"""POST /v1/rerank, /rerank and /v1/reranking (llama-server's alias): the body validated and ranked
(serving/rerank.py, which says how the documents are scored, admitted and cancelled)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.rerank import RerankRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.rerank import rerank as rank

bp = Blueprint("rerank", __name__)


@bp.post("/v1/rerank")
@bp.post("/rerank")
@bp.post("/v1/reranking")
def rerank() -> Response:
    # A result's document only when asked for (Cohere's and llama-server's answer leaves it out).
    return jsonify(rank(parse_body(RerankRequest, request.get_data(cache=False))).model_dump(exclude_none=True))
