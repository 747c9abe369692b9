"""Embeddings (/v1/embeddings), from a dedicated embedding model (engine/formats/encoder.py) or any
loaded language model (engine/embeddings.py).

An embeddings request is weighed and admitted like a generation: its input tokens count against
IMPETUS_MAX_REQUEST_TOKENS (400 beyond), it takes one of the engine's IMPETUS_MAX_BATCH +
IMPETUS_MAX_QUEUE places (503 when none is free), the engine computes it in slices between decode
steps, and it is cancelled when its client leaves, its deadline passes or an operator cancels it
(serving/running.py), as a generation is."""

from __future__ import annotations

import base64
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from gerdsen_ai_server.engine.embeddings import EmbeddingJob, hidden_size
from gerdsen_ai_server.engine.errors import EmbeddingCancelled, EngineGone, EngineOverloaded
from gerdsen_ai_server.engine.formats.encoder_base import EncoderModel
from gerdsen_ai_server.engine.protocol import WATCH_INTERVAL_S
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.models import resident_model
from gerdsen_ai_server.serving.prompts import capacity, completion_prompts
from gerdsen_ai_server.serving.running import Running, watch_embedding
from gerdsen_ai_server.store.errors import ModelNotFound

MAX_INPUTS = 256


def embed(body: EmbeddingRequest) -> EmbeddingList:
    """The request's inputs checked, embedded by the engine, shortened if asked, and encoded."""
    engine = services().engine
    loaded = resident_model(body.model, embedding=True)
    # The same four input shapes as a completion prompt. Token ids are taken as given: an embedding
    # model's [CLS]/[SEP] are added to text only, as its tokenizer does.
    inputs = completion_prompts(body, loaded, capacity(engine))
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"At most {MAX_INPUTS} inputs per request.", param="input", code="invalid_value")
    for tokens in inputs:
        if not tokens:
            raise APIError(400, "An input must not be empty.", param="input", code="invalid_value")
        if len(tokens) > loaded.context_length:  # refused, never silently truncated
            raise APIError(
                400,
                f"An input has {len(tokens)} tokens; this model's maximum context length is {loaded.context_length}.",
                param="input",
                code="context_length_exceeded",
            )
    if loaded.backend == "llamacpp":
        raise APIError(
            400,
            f"The model '{loaded.model_id}' runs on llama.cpp, which serves no embeddings here. Load it "
            'on MLX beside it (POST /api/models/load {"model": ..., "backend": "mlx", "alias": ...}) and '
            "embed with that alias, start with IMPETUS_BACKEND=mlx, or use an embedding model.",
            param="model",
            code="model_not_supported",
        )
    if loaded.backend == "mlx-vlm":  # engine/backends/vision.py: generation only
        raise APIError(
            400,
            f"The model '{loaded.model_id}' is a vision-language model, which serves no embeddings here; "
            "use an embedding model.",
            param="model",
            code="model_not_supported",
        )
    size = hidden_size(loaded.model)
    matryoshka = isinstance(loaded.model, EncoderModel) and loaded.model.matryoshka
    if body.dimensions is not None and body.dimensions > size:
        raise APIError(
            400,
            f"dimensions is {body.dimensions}; this model's embeddings have {size}.",
            param="dimensions",
            code="invalid_value",
        )
    if body.dimensions is not None and body.dimensions != size and not matryoshka:
        raise APIError(
            400,
            f"This model's embeddings have {size} dimensions and cannot be shortened (it does not "
            "declare Matryoshka training).",
            param="dimensions",
            code="invalid_value",
        )
    total = sum(len(t) for t in inputs)
    limit = services().settings.max_request_tokens
    if total > limit:
        raise APIError(
            400,
            f"The input has {total} tokens in all; this server embeds at most {limit} per request "
            "(IMPETUS_MAX_REQUEST_TOKENS). Send fewer or shorter inputs.",
            param="input",
            code="invalid_value",
        )
    try:
        job = engine.embed(loaded.model_id, inputs)
    except EngineOverloaded as exc:
        raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"}) from None
    except ModelNotFound as exc:  # unloaded since resident_model found it
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    vectors = wait(job, watch_embedding(job))
    if body.dimensions is not None and body.dimensions != size:
        vectors = shorten(vectors, body.dimensions, renormalise=loaded.model.pooling.normalize)
    data = [
        Embedding(
            index=i,
            embedding=v
            if body.encoding_format == "float"
            else base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode(),
        )
        for i, v in enumerate(vectors)
    ]
    return EmbeddingList(
        data=data, model=loaded.model_id, usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total)
    )


def wait(job: EmbeddingJob, entry: Running) -> list[list[float]]:
    """The job's vectors, checking every WATCH_INTERVAL_S that its client is still there, its
    deadline has not passed and no operator cancelled it; if one did, the job is cancelled and the
    engine drops it before its next slice."""
    while True:
        try:
            return job.future.result(timeout=WATCH_INTERVAL_S)
        except FutureTimeout:
            pass
        except EmbeddingCancelled:
            entry.check()  # says why: an operator's cancel
            raise APIError(503, "The embeddings were cancelled.", code="request_cancelled") from None
        except ModelNotFound as exc:  # unloaded while the job waited
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        except EngineGone as exc:
            raise APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"}) from None
        try:
            entry.check()
        except BaseException:
            job.cancel()
            raise


def shorten(vectors: list[list[float]], dimensions: int, renormalise: bool) -> list[list[float]]:
    """Matryoshka: the leading ``dimensions`` of each vector, back to unit length if it was."""
    short = np.asarray(vectors, dtype=np.float64)[:, :dimensions]
    if renormalise:
        short /= np.maximum(np.linalg.norm(short, axis=1, keepdims=True), 1e-12)
    vectors_out: list[list[float]] = short.tolist()
    return vectors_out
