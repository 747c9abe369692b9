"""POST /v1/embeddings, from a dedicated embedding model (engine/encoder.py) or any loaded language
model (engine/embeddings.py)."""

from __future__ import annotations

import base64
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from flask import Response, jsonify

from ..engine.embeddings import hidden_size
from ..engine.encoder import EncoderModel
from ..schemas.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from .errors import APIError
from .openai import bp, completion_prompts, engine, parse_body, resident_model

MAX_INPUTS = 256
# Tokens per engine command. The engine thread computes an embedding command whole, pausing every
# stream it decodes meanwhile: a large request goes in pieces, and streams step between them.
CHUNK_TOKENS = 512


@bp.post("/embeddings")
def embeddings() -> Response:
    body = parse_body(EmbeddingRequest)
    loaded = resident_model(body.model, embedding=True)
    # The same four input shapes as a completion prompt. Token ids are taken as given: an embedding
    # model's [CLS]/[SEP] are added to text only, as its tokenizer does.
    inputs = completion_prompts(body, loaded)
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"At most {MAX_INPUTS} inputs per request.", param="input", code="invalid_value")
    for tokens in inputs:
        if not tokens:
            raise APIError(400, "An input must not be empty.", param="input", code="invalid_value")
        if len(tokens) > loaded.context_length:  # refused, never silently truncated
            raise APIError(400, f"An input has {len(tokens)} tokens; this model's maximum context length is "
                           f"{loaded.context_length}.", param="input", code="context_length_exceeded")
    if getattr(loaded, "kind", None) == "llamacpp":
        raise APIError(400, f"The model '{loaded.model_id}' runs on llama.cpp, which serves no embeddings here; "
                       "use an MLX model (IMPETUS_BACKEND=mlx converts GGUF files to MLX).", param="model",
                       code="model_not_supported")
    size = hidden_size(loaded.model)
    matryoshka = isinstance(loaded.model, EncoderModel) and loaded.model.matryoshka
    if body.dimensions is not None and body.dimensions > size:
        raise APIError(400, f"dimensions is {body.dimensions}; this model's embeddings have {size}.",
                       param="dimensions", code="invalid_value")
    if body.dimensions is not None and body.dimensions != size and not matryoshka:
        raise APIError(400, f"This model's embeddings have {size} dimensions and cannot be shortened (it does not "
                       "declare Matryoshka training).", param="dimensions", code="invalid_value")
    vectors: list[list[float]] = []
    try:
        for chunk in chunks(inputs, CHUNK_TOKENS):
            vectors += engine().embed(loaded.model_id, chunk).result(timeout=300)
    except FutureTimeout:
        raise APIError(503, "The engine did not compute the embeddings in time.", code="timeout") from None
    if body.dimensions is not None and body.dimensions != size:
        vectors = shorten(vectors, body.dimensions, renormalise=loaded.model.pooling.normalize)
    data = [Embedding(index=i, embedding=v if body.encoding_format == "float" else
                      base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()) for i, v in enumerate(vectors)]
    tokens = sum(len(t) for t in inputs)
    return jsonify(EmbeddingList(data=data, model=loaded.model_id,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump())


def chunks(inputs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive inputs, grouped up to ``budget`` tokens (an input longer than that alone)."""
    out: list[list[list[int]]] = [[]]
    used = 0
    for tokens in inputs:
        if out[-1] and used + len(tokens) > budget:
            out.append([])
            used = 0
        out[-1].append(tokens)
        used += len(tokens)
    return out


def shorten(vectors: list[list[float]], dimensions: int, renormalise: bool) -> list[list[float]]:
    """Matryoshka: the leading ``dimensions`` of each vector, back to unit length if it was."""
    short = np.asarray(vectors, dtype=np.float64)[:, :dimensions]
    if renormalise:
        short /= np.maximum(np.linalg.norm(short, axis=1, keepdims=True), 1e-12)
    return short.tolist()
