"""POST /v1/embeddings, from any loaded language model (see engine/embeddings.py)."""

from __future__ import annotations

import base64
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from flask import Response, jsonify

from ..engine.embeddings import hidden_size
from ..schemas.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from .errors import APIError
from .openai import bp, completion_prompts, engine, parse_body, resident_model

MAX_INPUTS = 256


@bp.post("/embeddings")
def embeddings() -> Response:
    body = parse_body(EmbeddingRequest)
    loaded = resident_model(body.model)
    inputs = completion_prompts(body, loaded)  # the same four input shapes as a completion prompt
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"At most {MAX_INPUTS} inputs per request.", param="input", code="invalid_value")
    for tokens in inputs:
        if not tokens:
            raise APIError(400, "An input must not be empty.", param="input", code="invalid_value")
        if len(tokens) > loaded.context_length:
            raise APIError(400, f"An input has {len(tokens)} tokens; this model's maximum context length is "
                           f"{loaded.context_length}.", param="input", code="context_length_exceeded")
    size = hidden_size(loaded.model)
    if body.dimensions is not None and body.dimensions != size:
        raise APIError(400, f"This model's embeddings have {size} dimensions and cannot be shortened.",
                       param="dimensions", code="invalid_value")
    try:
        vectors = engine().embed(loaded.model_id, inputs).result(timeout=300)
    except FutureTimeout:
        raise APIError(503, "The engine did not compute the embeddings in time.", code="timeout") from None
    data = [Embedding(index=i, embedding=v if body.encoding_format == "float" else
                      base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()) for i, v in enumerate(vectors)]
    tokens = sum(len(t) for t in inputs)
    return jsonify(EmbeddingList(data=data, model=loaded.model_id,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump())
