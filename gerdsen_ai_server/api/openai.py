"""/v1: OpenAI-compatible chat completions, completions and models.

Thin on purpose: validate with the schemas, turn the request into ``GenerationRequest``s,
hand them to the engine, and serialize its ``TokenStream`` as JSON or Server-Sent Events.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel

from gerdsen_ai_server import __version__
from gerdsen_ai_server.api.metrics import track
from gerdsen_ai_server.api.requests import ClientGone, watch_streams
from gerdsen_ai_server.engine.engine import ContextLengthExceeded, EngineOverloaded, InferenceEngine
from gerdsen_ai_server.engine.formats.loaders import LoadedModel
from gerdsen_ai_server.engine.protocol import (
    EngineGone,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    TokenStream,
)
from gerdsen_ai_server.schemas.limits import (
    LONE_SURROGATE_ESCAPE,
    MAX_JSON_DEPTH,
    JSONShapeError,
    check_json_value,
    check_unicode,
    reject_constant,
)
from gerdsen_ai_server.schemas.openai import (
    MAX_EMBEDDING_INPUTS,
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
from gerdsen_ai_server.serving.logprobs import completion_logprobs
from gerdsen_ai_server.store.paths import model_not_found
from gerdsen_ai_server.web.errors import APIError, error_body

bp = Blueprint("openai", __name__, url_prefix="/v1")
FINGERPRINT = f"fp_impetus_{__version__}"
Schema = TypeVar("Schema", bound=BaseModel)


def engine() -> InferenceEngine:
    return current_app.extensions["impetus"]


def parse_body(schema: type[Schema]) -> Schema:
    """The body as ``schema``, or a 400: strict JSON (no NaN or Infinity, which Python's parser
    accepts), nested at most ``MAX_JSON_DEPTH`` levels (deeper was a RecursionError, a 500), then
    the schema's own strict types."""
    data = request.get_data(cache=False) or b"null"
    try:
        body = json.loads(data, parse_constant=reject_constant)
        check_json_value(body)
        if LONE_SURROGATE_ESCAPE.search(data):
            check_unicode(body)
    except JSONShapeError as exc:
        raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
    except RecursionError:
        raise APIError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                       code="nesting_too_deep") from None
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
    from gerdsen_ai_server.api.models import load  # models.py imports this module's helpers

    resident = engine().registry.get(model_id)
    if resident is not None and keep_alive is None:
        return resident.loaded
    if resident is None and not current_app.config["IMPETUS_SETTINGS"].autoload:
        raise APIError(404, f"The model '{model_id}' is not loaded (IMPETUS_AUTOLOAD is off).", param="model",
                       code="model_not_found")
    try:
        return load(model_id, keep_alive).loaded
    except APIError as exc:
        if exc.status == 404:  # one answer for every model that cannot be found (store.paths.model_not_found)
            raise APIError(404, str(model_not_found(model_id)), param="model", code="model_not_found") from None
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


# Why a known OpenAI field is refused rather than ignored: ignoring it would mislead (docs/clients.md,
# "Fields the SDKs send"). Fields not listed get the generic message.
UNSUPPORTED_WHY = {
    "audio": "The models served here produce text only, not audio.",
    "modalities": "The models served here produce text only, not audio.",
    "web_search_options": "This server has no web search; the answer would not be grounded in one.",
    "moderation": "This server runs no moderation model; the output would not be checked.",
    "reasoning_effort": "'reasoning_effort' is not supported with the models served here (they have no "
                        "reasoning effort control).",
    "verbosity": "The models served here have no verbosity control; only 'medium' is supported.",
}


def check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """What the schema cannot check alone, before any model is loaded or any text tokenized."""
    name = body.unsupported()
    if name is not None:
        message = UNSUPPORTED_WHY.get(name, f"The parameter '{name}' is not supported by this server yet.")
        raise APIError(400, message, param=name, code="unsupported_parameter")
    check_sequence_count(len(prompt_items(body.prompt)) if isinstance(body, CompletionRequest) else 1, body.n)
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
    """One engine request per prompt and choice (``n``), in choice-index order, registered with
    the running requests (api/requests.py): their readers end them when the client leaves, the
    deadline passes or an operator cancels.

    The request is weighed up front as OpenAI weighs it against a token budget: ``n`` x
    ``max_tokens`` (x prompts) may not exceed IMPETUS_MAX_REQUEST_TOKENS, so one request cannot
    book hours of decoding (``n=40, max_tokens=2000`` is 80,000 tokens)."""
    capacity = engine().max_batch + engine().max_queue
    if len(prompts) * body.n > capacity:
        raise APIError(400, f"This request asks for {len(prompts) * body.n} sequences; this server runs at most "
                       f"{capacity} at once (IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE).", param="n", code="invalid_value")
    budgets = []
    for tokens in prompts:
        if not tokens:
            raise APIError(400, "The prompt must not be empty.", param=param, code="invalid_value")
        budgets.append(completion_budget(loaded, len(tokens), requested))
    limit = current_app.config["IMPETUS_SETTINGS"].max_request_tokens
    if sum(budgets) * body.n > limit:
        prompts_part = f" x {len(prompts)} prompts" if len(prompts) > 1 else ""
        raise APIError(400, f"This request asks for up to {sum(budgets) * body.n} completion tokens (n={body.n} x "
                       f"max_tokens={max(budgets)}{prompts_part}); this server allows at most {limit} per request "
                       "(IMPETUS_MAX_REQUEST_TOKENS). Lower n or max_tokens.",
                       param="n" if body.n > 1 else "max_tokens", code="invalid_value")
    streams: list[TokenStream] = []
    try:
        for tokens, max_tokens in zip(prompts, budgets, strict=True):
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
    watch_streams(streams)  # GET/DELETE /api/requests; client gone, deadline
    return streams


def cancel_all(streams: list[TokenStream]) -> None:
    for stream in streams:
        stream.cancel()


def check_sequence_count(prompts: int, n: int) -> None:
    """Refuses more sequences than the engine runs and queues, before anything is tokenized: 20,000
    prompts used to cost ~6 s of CPU in the tokenizer before ``submit_all`` refused them."""
    capacity = engine().max_batch + engine().max_queue
    if prompts * n > capacity:
        raise APIError(400, f"This request asks for {prompts * n} sequences; this server runs at most "
                       f"{capacity} at once (IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE).", param="n", code="invalid_value")


_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# A token covers at most its vocabulary entry's length of text ("Ġthe" four bytes, "▁the" four
# characters, "##ing" three), unless the tokenizer's normalizer shrinks the text first (accents
# stripped, whitespace dropped): the margin keeps such texts from being refused wrongly.
TEXT_SIZE_MARGIN = 4


def max_token_chars(tokenizer: Any) -> int | None:
    """The longest vocabulary entry, measured once per tokenizer (~30 ms for 50k entries); None
    when the tokenizer does not list its vocabulary."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    source = tokenizer if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "_tokenizer", None)
    try:
        longest = max((len(piece) for piece in source.get_vocab()), default=0) if source is not None else 0
    except Exception:  # a tokenizer without a usable vocabulary listing: no size check
        return None
    if longest < 1:
        return None
    with contextlib.suppress(TypeError):  # not weak-referenceable: measured again next time
        _TOKEN_CHARS[tokenizer] = longest
    return longest


def check_text_size(loaded: LoadedModel, texts: list[str], param: str) -> None:
    """Refuses a text that cannot fit the context, before tokenizing it: at most ``max_token_chars``
    characters per token (with ``TEXT_SIZE_MARGIN``), so a longer text has more tokens than the
    context holds. An 8 MB prompt was tokenized whole (seconds of CPU) only to be refused."""
    longest = max(map(len, texts), default=0)
    if not longest:
        return
    per_token = max_token_chars(loaded.tokenizer)
    if per_token is None:
        return
    limit = loaded.context_length * per_token * TEXT_SIZE_MARGIN
    if longest > limit:
        raise APIError(400, f"A text in '{param}' has {longest} characters, more than any text that fits this "
                       f"model's context of {loaded.context_length} tokens.", param=param, code="context_length_exceeded")


def prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    """The separate prompts (or embedding inputs) of OpenAI's four shapes: a text, texts, one
    token-id list, token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def completion_prompts(body: CompletionRequest | EmbeddingRequest, loaded: LoadedModel) -> list[list[int]]:
    """Each prompt (or embedding input) as token ids. Counts and sizes are checked before the
    tokenizer runs, so a request that will be refused costs no tokenizing."""
    prompt = body.prompt if isinstance(body, CompletionRequest) else body.input
    param = "prompt" if isinstance(body, CompletionRequest) else "input"
    batches = prompt_items(prompt)
    if not batches:
        raise APIError(400, f"The {param} must not be empty.", param=param, code="invalid_value")
    if isinstance(body, CompletionRequest):
        check_sequence_count(len(batches), body.n)
    elif len(batches) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"At most {MAX_EMBEDDING_INPUTS} inputs per request.", param=param, code="invalid_value")
    check_text_size(loaded, [item for item in batches if isinstance(item, str)], param)
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
        except ClientGone:
            return  # nobody to tell
        except APIError as exc:  # the deadline, or an operator's cancel (api/requests.py)
            yield sse(exc.envelope())
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
