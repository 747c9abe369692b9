"""/v1: OpenAI-compatible chat completions, completions and models.

Thin on purpose: validate with the schemas, turn the request into ``GenerationRequest``s,
hand them to the engine, and serialize its ``TokenStream`` as JSON or Server-Sent Events.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel

from .. import __version__
from ..engine.engine import ContextLengthExceeded, EngineOverloaded, InferenceEngine
from ..engine.loaders import LoadedModel
from ..engine.stream import EngineGone, GenerationRequest, SamplingParams, TokenEvent, TokenLogprob, TokenStream
from ..schemas.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    Usage,
    _Generation,
)
from .errors import APIError, error_body
from .logprobs import completion_logprobs
from .metrics import track

bp = Blueprint("openai", __name__, url_prefix="/v1")
FINGERPRINT = f"fp_impetus_{__version__}"
Schema = TypeVar("Schema", bound=BaseModel)


def engine() -> InferenceEngine:
    return current_app.extensions["impetus"]


def parse_body(schema: type[Schema]) -> Schema:
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return schema.model_validate(body)


def resident_model(model_id: str, keep_alive: float | None = None, *, embedding: bool = False) -> LoadedModel:
    """The resident model, loading a local one on demand when IMPETUS_AUTOLOAD allows.

    A dedicated embedding model is refused (400) unless ``embedding``: it cannot generate text.
    """
    loaded = _resident_model(model_id, keep_alive)
    if loaded.kind == "embedding" and not embedding:
        raise APIError(400, f"The model '{model_id}' is an embedding model: it serves /v1/embeddings only, not "
                       "chat, completions or messages.", param="model", code="model_not_supported")
    return loaded


def _resident_model(model_id: str, keep_alive: float | None) -> LoadedModel:
    from .models import load  # models.py imports this module's helpers

    resident = engine().registry.get(model_id)
    if resident is not None and keep_alive is None:
        return resident.loaded
    if resident is None and not current_app.config["IMPETUS_SETTINGS"].autoload:
        raise APIError(404, f"The model '{model_id}' is not loaded (IMPETUS_AUTOLOAD is off).", param="model",
                       code="model_not_found")
    try:
        return load(model_id, keep_alive).loaded
    except APIError as exc:
        if exc.status == 404:
            raise APIError(404, f"The model '{model_id}' does not exist or is not loaded.", param="model",
                           code="model_not_found") from None
        raise


# ---- models ------------------------------------------------------------------------------


def model_card(loaded: LoadedModel, created: int) -> ModelCard:
    card = ModelCard(id=loaded.model_id, created=created, context_length=loaded.context_length)
    if loaded.kind == "embedding":
        card.kind, card.capabilities = "embedding", ["embeddings"]
        card.embedding_method = loaded.model.pooling.describe()
        card.dimensions = loaded.model.dimensions
        card.matryoshka = loaded.model.matryoshka
    return card


@bp.get("/models")
def list_models() -> Response:
    created = int(engine().started_at)
    return jsonify(ModelList(data=[model_card(m, created) for m in engine().models()]).model_dump())


@bp.get("/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    resident = engine().registry.get(model_id)
    if resident is None:
        raise APIError(404, f"The model '{model_id}' does not exist or is not loaded.", param="model",
                       code="model_not_found")
    return jsonify(model_card(resident.loaded, int(engine().started_at)).model_dump())


# ---- request → engine --------------------------------------------------------------------


def sampling_params(body: _Generation, choice: int = 0) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        # n > 1 with a seed: each choice reproducible, and different from the others.
        seed=None if body.seed is None else body.seed + choice,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
    )


def check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    name = body.unsupported()
    if name is not None:
        raise APIError(400, f"The parameter '{name}' is not supported by this server yet.", param=name,
                       code="unsupported_parameter")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs", code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options",
                       code="invalid_value")
    vocab = None
    for token in (body.logit_bias or {}):
        vocab = vocab or len(resident_model(body.model).tokenizer)
        if int(token) >= vocab:
            raise APIError(400, f"logit_bias names token {token}, outside the vocabulary.", param="logit_bias",
                           code="invalid_value")
    if body.top_k:
        # mlx-lm refuses top_k >= vocabulary inside the engine's batched step (and that failure used to
        # break every later request): refuse it here, as a 400.
        vocab = vocab or len(resident_model(body.model).tokenizer)
        if body.top_k >= vocab:
            raise APIError(400, f"top_k is {body.top_k}, but the model's vocabulary has {vocab} tokens; use a "
                           "smaller value, or 0 for no top-k filtering.", param="top_k", code="invalid_value")


def completion_budget(loaded: LoadedModel, prompt_len: int, requested: int | None) -> int:
    """max_tokens as asked, or what the context has left (capped by the server default)."""
    limit = current_app.config["IMPETUS_SETTINGS"].max_tokens_limit
    if requested is not None:
        if requested > limit:
            raise APIError(400, f"max_tokens is {requested}, but this server allows at most {limit} "
                           "(IMPETUS_MAX_TOKENS_LIMIT).", param="max_tokens", code="invalid_value")
        return requested
    room = loaded.context_length - prompt_len
    if room < 1:
        raise APIError(400, str(ContextLengthExceeded(prompt_len, 1, loaded.context_length)), param="messages",
                       code="context_length_exceeded")
    return min(current_app.config["IMPETUS_SETTINGS"].max_tokens_default, room, limit)


def submit_all(
    body: ChatCompletionRequest | CompletionRequest, loaded: LoadedModel, prompts: list[list[int]],
    requested: int | None, param: str, processors: Callable[[], list[Any]] = list,
) -> list[TokenStream]:
    """One engine request per prompt and choice (``n``), in choice-index order."""
    capacity = engine().max_batch + engine().max_queue
    if len(prompts) * body.n > capacity:
        raise APIError(400, f"This request asks for {len(prompts) * body.n} sequences; this server runs at most "
                       f"{capacity} at once (IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE).", param="n", code="invalid_value")
    streams: list[TokenStream] = []
    try:
        for tokens in prompts:
            if not tokens:
                raise APIError(400, "The prompt must not be empty.", param=param, code="invalid_value")
            max_tokens = completion_budget(loaded, len(tokens), requested)
            for choice in range(body.n):
                gen = GenerationRequest(
                    model=loaded.model_id,
                    prompt_tokens=tokens,
                    max_tokens=max_tokens,
                    sampling=sampling_params(body, choice),
                    stop=body.stop_list(),
                    logprobs=body.logprob_count(),
                    strip_leading_space=isinstance(body, ChatCompletionRequest),
                    logits_processors=processors(),
                )
                streams.append(engine().submit(gen))
    except ContextLengthExceeded as exc:
        cancel_all(streams)
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    except EngineOverloaded as exc:
        cancel_all(streams)
        raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"}) from None
    except BaseException:
        cancel_all(streams)
        raise
    track(streams)  # TTFT, tokens and request_event when the response closes (api/metrics.py)
    return streams


def cancel_all(streams: list[TokenStream]) -> None:
    for stream in streams:
        stream.cancel()


def completion_prompts(body: CompletionRequest | EmbeddingRequest, loaded: LoadedModel) -> list[list[int]]:
    prompt = body.prompt if isinstance(body, CompletionRequest) else body.input
    param = "prompt" if isinstance(body, CompletionRequest) else "input"
    if isinstance(prompt, str):
        batches: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        batches = [prompt]
    else:
        batches = list(prompt)
    if not batches:
        raise APIError(400, f"The {param} must not be empty.", param=param, code="invalid_value")
    vocab = len(loaded.tokenizer)
    out: list[list[int]] = []
    for item in batches:
        tokens = loaded.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if any(t < 0 or t >= vocab for t in tokens):
            raise APIError(400, f"The {param} holds token ids outside the vocabulary (0..{vocab - 1}).",
                           param=param, code="invalid_value")
        out.append(tokens)
    return out


# ---- engine → wire -----------------------------------------------------------------------


@dataclass
class Finished:
    """One choice read to its end."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: list[TokenLogprob]


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams


def event_stream(chunks: Iterator[str], streams: list[TokenStream]) -> Response:
    def body() -> Iterator[str]:
        try:
            yield from chunks
        except EngineGone as exc:
            yield sse(error_body(503, str(exc), code="engine_unavailable"))
        finally:
            cancel_all(streams)  # a client that went away frees its slot at the next step
        yield sse("[DONE]")

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)


def collect(streams: list[TokenStream]) -> list[Finished]:
    results = []
    try:
        for stream in streams:
            parts: list[str] = []
            logprobs: list[TokenLogprob] = []
            last = None
            for event in stream:
                parts.append(event.text)
                logprobs += event.logprobs
                last = event
            assert last is not None
            if last.error:
                raise APIError(500, last.error, code="generation_failed")
            results.append(Finished("".join(parts), last.finish_reason, last.completion_tokens, logprobs))
    except EngineGone as exc:
        raise APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"}) from None
    finally:
        cancel_all(streams)
    return results


def chunk_payload(chunk: ChatCompletionChunk | Completion, include_usage: bool) -> dict[str, Any]:
    """OpenAI's chunk shape: nulls kept, ``usage`` only when asked for, deltas without unset keys."""
    payload = chunk.model_dump()
    if not include_usage:
        payload.pop("usage", None)
    for choice in payload["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return payload


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def request_meta(prefix: str, loaded: LoadedModel) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": loaded.model_id,
            "system_fingerprint": FINGERPRINT}


def relay(streams: list[TokenStream]) -> Iterator[tuple[int, TokenEvent]]:
    """Every stream's events, tagged with the choice index. All run together in the engine's
    batch; we relay them in order, so later choices arrive from their buffer at once."""
    for index, stream in enumerate(streams):
        for event in stream:
            yield index, event


@bp.post("/completions")
def completions() -> Response:
    body = parse_body(CompletionRequest)
    check_supported(body)
    loaded = resident_model(body.model, body.keep_alive)
    prompts = completion_prompts(body, loaded)
    streams = submit_all(body, loaded, prompts, body.max_tokens, "prompt")
    meta = request_meta("cmpl", loaded)
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(completion_chunks(meta, streams, prompt_tokens, include_usage, body, loaded), streams)
    results = collect(streams)
    top = bool(body.logprobs)
    choices = [
        CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,
                         logprobs=None if body.logprobs is None else completion_logprobs(r.logprobs, loaded.tokenizer,
                                                                                         0, top))
        for i, r in enumerate(results)
    ]
    total = usage(prompt_tokens, sum(r.completion_tokens for r in results))
    return jsonify(Completion(**meta, choices=choices, usage=total).model_dump())


def completion_chunks(meta: dict[str, Any], streams: list[TokenStream], prompt_tokens: int, include_usage: bool,
                      body: CompletionRequest, loaded: LoadedModel) -> Iterator[str]:
    completion_tokens = 0
    offsets = [0] * len(streams)
    for index, event in relay(streams):
        if event.error:
            yield sse(error_body(500, event.error, code="generation_failed"))
            return
        if event.text or event.finish_reason or (body.logprobs is not None and event.logprobs):
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(event.logprobs, loaded.tokenizer, offsets[index], bool(body.logprobs))
            offsets[index] += len(event.text)
            choice = CompletionChoice(index=index, text=event.text, finish_reason=event.finish_reason, logprobs=lp)
            yield sse(chunk_payload(Completion(**meta, choices=[choice]), include_usage))
        if event.done:
            completion_tokens += event.completion_tokens
    if include_usage:
        yield sse(Completion(**meta, choices=[], usage=usage(prompt_tokens, completion_tokens)).model_dump())
