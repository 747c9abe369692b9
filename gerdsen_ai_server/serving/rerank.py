"""Rerank (/v1/rerank, /rerank, llama-server's /v1/reranking): a cross-encoder (a reranker folder,
engine/formats/cross_encoder.py) scores each (query, document) pair; the documents' indexes come
back by score, the most relevant first.

The shape is the one llama-server, vLLM, Jina and Cohere share ({"model", "query", "documents",
"top_n", "return_documents"} -> {"results": [{"index", "relevance_score", "document"?}], "usage"}).
Scores are the head's logit through sigmoid, as vLLM and sentence-transformers' CrossEncoder give
them (Identity where the model declares it); llama-server returns the raw logit (same order).

Each pair is the tokenizer's own pair encoding, weighed and admitted as an embeddings request is
(serving/embeddings.py): a pair longer than the model reads is a 400 ``context_length_exceeded``,
never truncated (sentence-transformers and vLLM truncate; we refuse, as for every prompt); all
pairs' tokens count against IMPETUS_MAX_REQUEST_TOKENS; the engine scores them in slices between
decode steps (an EmbeddingJob with the pairs' segments); a client that leaves cancels it.
"""

from __future__ import annotations

import uuid

from gerdsen_ai_server.engine.errors import EngineOverloaded
from gerdsen_ai_server.engine.formats.encoder import EncoderTokenizer
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.rerank import (
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultDocument,
    RerankUsage,
)
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.embeddings import wait
from gerdsen_ai_server.serving.models import resident_model
from gerdsen_ai_server.serving.running import watch_embedding
from gerdsen_ai_server.store.errors import ModelNotFound


def rerank(body: RerankRequest) -> RerankResponse:
    """The documents scored against the query by the named reranker, sorted, cut to ``top_n``."""
    engine = services().engine
    loaded = resident_model(body.model, rerank=True)
    tokenizer = loaded.tokenizer
    if not isinstance(tokenizer, EncoderTokenizer):  # resident_model let only a cross-encoder through
        raise APIError(
            400, f"The model '{loaded.model_id}' is not a reranker.", param="model", code="model_not_supported"
        )
    texts = [document if isinstance(document, str) else document.text for document in body.documents]
    pairs = [tokenizer.encode_pair(body.query, text) for text in texts]
    for index, (ids, _) in enumerate(pairs):
        if len(ids) > loaded.context_length:  # refused, never silently truncated
            raise APIError(
                400,
                f"The query with document {index} is {len(ids)} tokens; this model reads at most "
                f"{loaded.context_length}. Shorten the query or split the document.",
                param="documents",
                code="context_length_exceeded",
            )
    total = sum(len(ids) for ids, _ in pairs)
    limit = services().settings.max_request_tokens
    if total > limit:
        raise APIError(
            400,
            f"The query with every document comes to {total} tokens; this server scores at most {limit} "
            "per request (IMPETUS_MAX_REQUEST_TOKENS). Send fewer or shorter documents.",
            param="documents",
            code="invalid_value",
        )
    try:
        job = engine.embed(loaded.model_id, [ids for ids, _ in pairs], [segment for _, segment in pairs])
    except EngineOverloaded as exc:
        raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"}) from None
    except ModelNotFound as exc:  # unloaded since resident_model found it
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    scores = [row[0] for row in wait(job, watch_embedding(job))]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]  # stable: ties keep their order
    results = [
        RerankResult(
            index=i,
            relevance_score=scores[i],
            document=RerankResultDocument(text=texts[i]) if body.return_documents else None,
        )
        for i in order
    ]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=loaded.model_id,
        results=results,
        usage=RerankUsage(prompt_tokens=total, total_tokens=total),
    )
