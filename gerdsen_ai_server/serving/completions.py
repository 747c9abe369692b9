"""OpenAI completions (/v1/completions): prompts in, the engine's streams out as a ``Completion``
(plain JSON) or its chunks (Server-Sent Events)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.protocol import TokenEvent, TokenStream
from gerdsen_ai_server.schemas.openai import Completion, CompletionChoice, CompletionRequest
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.adapters import resident_for
from gerdsen_ai_server.serving.envelope import chunk_payload, request_meta, usage
from gerdsen_ai_server.serving.generation import check_supported, collect, submit_all
from gerdsen_ai_server.serving.logprobs import completion_logprobs
from gerdsen_ai_server.serving.presets import apply_preset
from gerdsen_ai_server.serving.prompts import capacity, completion_prompts
from gerdsen_ai_server.serving.sse import TextChunk, sse, writes


@dataclass
class CompletionStarted:
    body: CompletionRequest
    loaded: LoadedModel
    meta: dict[str, Any]
    prompt_tokens: int
    streams: list[TokenStream]


def start_completion(body: CompletionRequest) -> CompletionStarted:
    """Validate, tokenize the prompts and submit one engine request per prompt and choice."""
    body = apply_preset(body)  # a preset's defaults under the request's own (serving/presets.py)
    check_supported(body)
    loaded = resident_for(body.model, body.adapters, body.keep_alive)  # the adapter's own resident, if any
    prompts = completion_prompts(body, loaded, capacity(services().engine))
    streams = submit_all(body, loaded, prompts, body.max_tokens, "prompt")
    return CompletionStarted(body, loaded, request_meta("cmpl", loaded), sum(len(p) for p in prompts), streams)


def completion(started: CompletionStarted) -> Completion:
    """Every choice read to its end, as one ``Completion``."""
    body, loaded = started.body, started.loaded
    results = collect(started.streams)
    top = bool(body.logprobs)
    choices = [
        CompletionChoice(
            index=i,
            text=r.text,
            finish_reason=r.finish_reason,
            logprobs=None if body.logprobs is None else completion_logprobs(r.logprobs, loaded.tokenizer, 0, top),
        )
        for i, r in enumerate(results)
    ]
    total = usage(started.prompt_tokens, sum(r.completion_tokens for r in results))
    return Completion(**started.meta, choices=choices, usage=total)


def completion_chunks(started: CompletionStarted) -> Iterator[str]:
    """The chunks as SSE events; the events of tokens that reached the reader together go out as one
    write (generation.waiting), and a plain text chunk is rendered from its choice's template (TextChunk)."""
    body, loaded, meta, streams = started.body, started.loaded, started.meta, started.streams
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, text: str, finish: str | None = None, lp: Any = None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=lp)
        return sse(chunk_payload(Completion(**meta, choices=[choice]), include_usage))

    texts = [TextChunk(partial(chunk, index)) for index in range(len(streams))]
    completion_tokens = 0
    offsets = [0] * len(streams)

    def render(index: int, event: TokenEvent) -> list[str]:
        nonlocal completion_tokens
        out: list[str] = []
        if event.error:
            return out
        if event.text or event.finish_reason or (body.logprobs is not None and event.logprobs):
            if body.logprobs is None and event.finish_reason is None:
                out.append(texts[index](event.text))
            else:
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(event.logprobs, loaded.tokenizer, offsets[index], bool(body.logprobs))
                out.append(chunk(index, event.text, event.finish_reason, lp))
            offsets[index] += len(event.text)
        if event.done:
            completion_tokens += event.completion_tokens
        return out

    def tail() -> list[str]:
        if not include_usage:
            return []
        return [sse(Completion(**meta, choices=[], usage=usage(started.prompt_tokens, completion_tokens)).model_dump())]

    yield from writes(streams, render, tail)
