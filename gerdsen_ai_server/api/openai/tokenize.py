"""POST /tokenize, /detokenize (vLLM's) and /apply-template (llama-server's), at the root as both
serve them, not under /v1 (serving/tokenize.py renders and tokenizes)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.schemas.tokenize import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.tokenize import apply_template, detokenize, tokenize

bp = Blueprint("tokenize", __name__)


@bp.post("/tokenize")
def tokenize_route() -> Response:
    return jsonify(tokenize(parse_body(TokenizeRequest, request.get_data(cache=False))).model_dump())


@bp.post("/detokenize")
def detokenize_route() -> Response:
    return jsonify(detokenize(parse_body(DetokenizeRequest, request.get_data(cache=False))).model_dump())


@bp.post("/apply-template")
def apply_template_route() -> Response:
    return jsonify(apply_template(parse_body(ApplyTemplateRequest, request.get_data(cache=False))).model_dump())
