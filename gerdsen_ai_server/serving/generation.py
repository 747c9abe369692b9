"""Generation requests into the engine and its streams back out, for every API that generates
(OpenAI completions and chat, Anthropic Messages, Responses, Socket.IO ``generate``): what the
schema cannot check alone, the completion budget, one engine request per prompt and choice,
reading the streams to their end, and cancelling them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.errors import ContextLengthExceeded, EngineOverloaded
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.protocol import (
    EngineGone,
    EventSource,
    GenerationRequest,
    SamplingParams,
    SpeculativeParams,
    TokenEvent,
    TokenLogprob,
    TokenStream,
)
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, CompletionRequest, _Generation
from gerdsen_ai_server.schemas.speculative import parse_setting
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.adapters import resident_for
from gerdsen_ai_server.serving.images import check_images, image_parts, require_vision
from gerdsen_ai_server.serving.models import resident_model
from gerdsen_ai_server.serving.prompts import capacity, check_sequence_count, prompt_items
from gerdsen_ai_server.serving.running import watch_streams
from gerdsen_ai_server.serving.tracking import track


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


def speculative_params(body: _Generation, loaded: LoadedModel, settings: Settings) -> SpeculativeParams | None:
    """The request's speculative_config, else the server's IMPETUS_SPECULATIVE (vLLM's names). MLX models
    only (engine/speculative.py): asked for explicitly on a llama.cpp model it is a 400 naming it. A
    draft model (the config's ``model``, else IMPETUS_DRAFT_MODEL) is loaded like a request's model and
    must be an MLX model of the same vocabulary."""
    config = body.speculative_config or parse_setting(settings.speculative)
    if config is None or config.method == "none":
        return None
    if loaded.backend != "mlx":
        if body.speculative_config is None:
            return None  # the server default applies where it can
        raise APIError(
            400,
            f"speculative_config is supported for MLX models only; '{body.model}' runs on {loaded.backend}.",
            param="speculative_config",
            code="unsupported_parameter",
        )
    draft = None
    if config.method == "draft_model":
        draft_id = config.model or settings.draft_model
        if not draft_id:
            raise APIError(
                400,
                'speculative_config method "draft_model" needs a draft model: its "model", or the server\'s '
                "IMPETUS_DRAFT_MODEL.",
                param="speculative_config.model",
                code="invalid_value",
            )
        found = resident_model(draft_id)
        if found.backend != "mlx" or len(found.tokenizer) != len(loaded.tokenizer):
            raise APIError(
                400,
                f"The draft model '{draft_id}' must be an MLX model with the vocabulary of '{body.model}' "
                f"({len(loaded.tokenizer)} tokens).",
                param="speculative_config.model",
                code="invalid_value",
            )
        draft = found.model
    return SpeculativeParams(
        method=config.method,
        num_tokens=config.num_speculative_tokens,
        lookup_max=config.prompt_lookup_max,
        lookup_min=config.prompt_lookup_min,
        draft=draft,
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
    check_sequence_count(
        len(prompt_items(body.prompt)) if isinstance(body, CompletionRequest) else 1,
        body.n,
        capacity(services().engine),
    )
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs", code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true.", param="stream_options", code="invalid_value"
        )
    if isinstance(body, ChatCompletionRequest) and image_parts(body):  # before the model: the cheap bounds
        check_images(body)
        require_vision(body, resident_for(body.model, body.adapters))  # a text model: 400 model_not_supported
    vocab = None
    for token in body.logit_bias or {}:
        vocab = vocab or len(resident_for(body.model, body.adapters).tokenizer)
        if int(token) >= vocab:
            raise APIError(
                400,
                f"logit_bias names token {token}, outside the vocabulary.",
                param="logit_bias",
                code="invalid_value",
            )
    if body.top_k:
        # mlx-lm refuses top_k >= vocabulary inside the engine's batched step (and that failure used to
        # break every later request): refuse it here, as a 400.
        vocab = vocab or len(resident_for(body.model, body.adapters).tokenizer)
        if body.top_k >= vocab:
            raise APIError(
                400,
                f"top_k is {body.top_k}, but the model's vocabulary has {vocab} tokens; use a "
                "smaller value, or 0 for no top-k filtering.",
                param="top_k",
                code="invalid_value",
            )


def completion_budget(loaded: LoadedModel, prompt_len: int, requested: int | None, settings: Settings) -> int:
    """max_tokens as asked, or what the context has left (capped by the server default)."""
    limit = settings.max_tokens_limit
    if requested is not None:
        if requested > limit:
            raise APIError(
                400,
                f"max_tokens is {requested}, but this server allows at most {limit} (IMPETUS_MAX_TOKENS_LIMIT).",
                param="max_tokens",
                code="invalid_value",
            )
        return requested
    room = loaded.context_length - prompt_len
    if room < 1:
        raise APIError(
            400,
            str(ContextLengthExceeded(prompt_len, 1, loaded.context_length)),
            param="messages",
            code="context_length_exceeded",
        )
    return min(settings.max_tokens_default, room, limit)


def submit_all(
    body: ChatCompletionRequest | CompletionRequest,
    loaded: LoadedModel,
    prompts: list[list[int]],
    requested: int | None,
    param: str,
    processors: Callable[[], list[Any]] = list,
    images: Sequence[ImageInput] = (),
) -> list[TokenStream]:
    """One engine request per prompt and choice (``n``), in choice-index order, registered with
    the running requests (serving/running.py): their readers end them when the client leaves, the
    deadline passes or an operator cancels.

    The request is weighed up front as OpenAI weighs it against a token budget: ``n`` x
    ``max_tokens`` (x prompts) may not exceed IMPETUS_MAX_REQUEST_TOKENS, so one request cannot
    book hours of decoding (``n=40, max_tokens=2000`` is 80,000 tokens)."""
    engine, settings = services().engine, services().settings
    check_sequence_count(len(prompts), body.n, capacity(engine))
    budgets = []
    for tokens in prompts:
        if not tokens:
            raise APIError(400, "The prompt must not be empty.", param=param, code="invalid_value")
        budgets.append(completion_budget(loaded, len(tokens), requested, settings))
    limit = settings.max_request_tokens
    if sum(budgets) * body.n > limit:
        prompts_part = f" x {len(prompts)} prompts" if len(prompts) > 1 else ""
        raise APIError(
            400,
            f"This request asks for up to {sum(budgets) * body.n} completion tokens (n={body.n} x "
            f"max_tokens={max(budgets)}{prompts_part}); this server allows at most {limit} per request "
            "(IMPETUS_MAX_REQUEST_TOKENS). Lower n or max_tokens.",
            param="n" if body.n > 1 else "max_tokens",
            code="invalid_value",
        )
    streams: list[TokenStream] = []
    speculative = speculative_params(body, loaded, settings)
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
                    # A continued message (continue_final_message) keeps its joining space.
                    strip_leading_space=isinstance(body, ChatCompletionRequest) and not body.continue_final_message,
                    logits_processors=processors(),
                    speculative=speculative,
                    images=list(images),  # a vision model's images, for its placeholders (serving/chat.py)
                )
                streams.append(engine.submit(gen))
    except ContextLengthExceeded as exc:
        cancel_all(streams)
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    except EngineOverloaded as exc:
        cancel_all(streams)
        raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"}) from None
    except BaseException:
        cancel_all(streams)
        raise
    for stream in streams:
        stream.coalesce = settings.stream_coalesce_ms / 1000  # serving/sse.py writes
    track(streams)  # TTFT, tokens and request_event when the response closes (serving/tracking.py)
    watch_streams(streams)  # GET/DELETE /api/requests; client gone, deadline
    return streams


def cancel_all(streams: Sequence[EventSource]) -> None:
    for stream in streams:
        stream.cancel()


@dataclass
class Finished:
    """One choice read to its end."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: list[TokenLogprob]


def collect(streams: Sequence[EventSource]) -> list[Finished]:
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
            if last is None:
                raise RuntimeError("the token stream ended without a final event")
            if last.error:
                raise APIError(500, last.error, code="generation_failed")
            results.append(Finished("".join(parts), last.finish_reason, last.completion_tokens, logprobs))
    except EngineGone as exc:
        raise APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"}) from None
    finally:
        cancel_all(streams)
    return results


def relay(streams: Sequence[EventSource]) -> Iterator[tuple[int, TokenEvent]]:
    """Every stream's events, tagged with the choice index. All run together in the engine's
    batch; we relay them in order, so later choices arrive from their buffer at once."""
    for index, stream in enumerate(streams):
        for event in stream:
            yield index, event


def waiting(stream: EventSource) -> bool:
    """Whether ``stream``'s next event is already there (``TokenStream.ready``): a streaming
    response then keeps what it has rendered and sends it with what follows, in one write. The
    events of one engine step reach a reader together when it fell behind (a busy machine, speculative
    decoding's several tokens a step, a later choice read from its buffer): one write and one wake-up
    of the client for all of them, where each token was one before."""
    return isinstance(stream, TokenStream) and stream.ready
