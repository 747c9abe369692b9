"""Chat: messages (and tools) into a prompt, the engine's streams into chat completions — plain
JSON or Server-Sent Events — with tool calls and JSON-constrained output. ``start_chat`` is the one
path every chat-shaped API (OpenAI chat, Anthropic Messages, Responses, Socket.IO ``generate``)
takes into the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from jinja2.exceptions import SecurityError

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.backends.llamacpp import LlamaCppBackend
from gerdsen_ai_server.engine.backends.vision import VisionBackend
from gerdsen_ai_server.engine.grammar import GrammarError, GrammarProcessor, compile_json_schema, strict_schema
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.protocol import EventSource, TokenEvent, TokenStream
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    DeltaToolCall,
    ToolCall,
)
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.adapters import resident_for
from gerdsen_ai_server.serving.chat_template import TemplateTimeout, render_chat_template
from gerdsen_ai_server.serving.envelope import chunk_payload, request_meta, usage
from gerdsen_ai_server.serving.generation import cancel_all, check_supported, collect, submit_all
from gerdsen_ai_server.serving.images import check_images, image_parts, images_for, template_content
from gerdsen_ai_server.serving.logprobs import chat_logprobs
from gerdsen_ai_server.serving.presets import apply_preset
from gerdsen_ai_server.serving.prompts import check_text_size
from gerdsen_ai_server.serving.reasoning import ReasoningPlan, reasoning_plan, split_reasoning, template_kwargs
from gerdsen_ai_server.serving.sse import TextChunk, sse, writes
from gerdsen_ai_server.serving.tools import (
    ToolCallSplitter,
    ToolPlan,
    answer_parts,
    finish_reason,
    plan_tools,
    split_answer,
    template_messages,
)


def chat_prompt(body: ChatCompletionRequest, loaded: LoadedModel, plan: ToolPlan) -> list[int]:
    """The prompt's token ids, each image's tokens included (``built_prompt``): what /tokenize and
    Anthropic's count_tokens count, so their count is the chat's ``usage.prompt_tokens``."""
    return built_prompt(body, loaded, plan)[1]


def built_prompt(
    body: ChatCompletionRequest, loaded: LoadedModel, plan: ToolPlan
) -> tuple[str, list[int], list[ImageInput]]:
    """The prompt as the engine gets it: its text, its ids and its images. Without images,
    ``chat_text`` tokenized (its special tokens are in the text); with images (a vision model: a text
    model is a 400 here), each placeholder expanded into the image's tokens by the model's processor."""
    images = images_for(body, loaded)[1] if image_parts(body) else []  # decoded and bounded
    text = chat_text(body, loaded, plan, images=bool(images))
    if images:  # the images go with the request (GenerationRequest.images)
        return text, vision_prompt(loaded, text, images), images
    return text, list(loaded.tokenizer.encode(text, add_special_tokens=False)), images


def chat_text(body: ChatCompletionRequest, loaded: LoadedModel, plan: ToolPlan, images: bool = False) -> str:
    """The prompt as text: the model's chat template rendered within its deadline and bounds
    (serving/chat_template.py), its size checked against the context. One path for chat and for
    /tokenize and /apply-template (serving/tokenize.py), so what they show cannot drift.
    ``images``: messages with images keep their parts, each image as HF's ``{"type": "image"}``,
    where a vision model's template writes its placeholder."""
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "has_chat_template", True):
        raise APIError(
            400,
            f"The model '{loaded.model_id}' has no chat template; use /v1/completions.",
            param="model",
            code="invalid_value",
        )
    messages, extra = template_messages(body, plan, tokenizer)
    messages = with_image_parts(body, messages, media_marker(loaded)) if images else messages
    constrained = plan.mode == "forced" or body.json_schema() is not None
    extra = {**template_kwargs(body, tokenizer, constrained), **extra}  # the request's variables, then its tools
    seconds = services().settings.template_timeout
    try:
        text = render_chat_template(
            tokenizer,
            messages,
            extra,
            seconds,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        )
    except TemplateTimeout:
        raise APIError(
            500,
            f"The model '{loaded.model_id}' has a chat template that took more than {seconds:g} s to "
            "render these messages (IMPETUS_TEMPLATE_TIMEOUT); it was stopped.",
            code="chat_template_timeout",
        ) from None
    except SecurityError as exc:
        raise APIError(
            500,
            f"The model '{loaded.model_id}' has a chat template that was stopped: {exc}.",
            code="chat_template_unsafe",
        ) from None
    except RecursionError:
        raise APIError(
            500,
            f"The model '{loaded.model_id}' has a chat template that recursed too deeply.",
            code="chat_template_unsafe",
        ) from None
    except Exception as exc:  # a template may reject e.g. a role order it does not support
        raise APIError(
            400, f"The chat template rejected these messages: {exc}", param="messages", code="invalid_value"
        ) from None
    check_text_size(loaded, [text], "messages")
    return text


def media_marker(loaded: LoadedModel) -> str | None:
    """libmtmd's media marker for a llama.cpp vision model (engine/backends/llamacpp_vision.py); None
    for mlx-vlm, whose templates write the image placeholder themselves."""
    backend = loaded.model
    return backend.vision.marker if isinstance(backend, LlamaCppBackend) and backend.vision else None


def with_image_parts(
    body: ChatCompletionRequest, messages: list[dict[str, Any]], marker: str | None = None
) -> list[dict[str, Any]]:
    """``template_messages``' messages with each message that has images given its parts back
    (serving/images.py ``template_content``). They map one to one from the end: tools described in
    the prompt may have put a system message first. ``marker``: as llama-server does for llama.cpp,
    each image is the media marker and the parts are one text, joined by newlines."""
    offset = len(messages) - len(body.messages)
    out = list(messages)
    for i, message in enumerate(body.messages):
        content = template_content(message)
        if not isinstance(content, str) and i + offset >= 0:
            if marker is not None:
                content = "\n".join(p["text"] if p["type"] == "text" else marker for p in content)
            out[i + offset] = {**out[i + offset], "content": content}
    return out


def vision_prompt(loaded: LoadedModel, text: str, images: list[ImageInput]) -> list[int]:
    """The prompt's ids with each image placeholder expanded into the image's tokens by the model's
    own processor (engine/backends/vision.py), so the context check and usage count them."""
    backend = loaded.model
    if not isinstance(backend, VisionBackend | LlamaCppBackend) or not backend.capabilities.vision:  # refused already
        raise APIError(400, f"The model '{loaded.model_id}' cannot take images.", code="model_not_supported")
    try:
        return backend.prompt_ids(text, images)
    except Exception as exc:  # the processor refused them (a size or count its family cannot take)
        raise APIError(
            400, f"The model's processor could not take these images: {str(exc)[:200]}", code="invalid_image"
        ) from None


def constraint_factory(body: ChatCompletionRequest, loaded: LoadedModel, plan: ToolPlan) -> Callable[[], list[Any]]:
    """A new grammar processor per choice when the output must be a tool call or follow a schema.
    A ``json_schema`` is held to OpenAI's strict semantics whatever its ``strict`` flag (as the tools'
    schemas are, in ``plan_tools``): clients such as LangChain leave the flag unset and still expect
    output that validates with no undeclared keys."""
    schema, param = (plan.schema, "tools") if plan.schema is not None else (body.json_schema(), "response_format")
    if schema is None:
        return list
    if plan.schema is None and body.response_format is not None and body.response_format.type == "json_schema":
        schema = strict_schema(schema)
    try:
        grammar = compile_json_schema(loaded.tokenizer, schema)
    except GrammarError as exc:
        raise APIError(400, f"Invalid JSON schema in {param}: {exc}", param=param, code="invalid_value") from None
    return lambda: [GrammarProcessor(loaded.tokenizer, grammar)]


@dataclass
class Started:
    loaded: LoadedModel
    plan: ToolPlan
    prompt: list[int]
    streams: list[TokenStream]
    reasoning: ReasoningPlan | None = None  # a thinking model's split (serving/reasoning.py)


def start_chat(chat: ChatCompletionRequest, param: str) -> Started:
    """Validate, build the prompt and submit: the one path every chat-shaped API (OpenAI chat,
    Anthropic Messages, Responses) takes into the engine."""
    chat = apply_preset(chat)  # a preset's defaults under the request's own (serving/presets.py)
    check_supported(chat)
    check_images(chat)  # what needs no model: the count, the schemes, the sizes (serving/images.py)
    loaded = resident_for(chat.model, chat.adapters, chat.keep_alive)  # the adapter's own resident, if any
    plan = plan_tools(chat, loaded.tokenizer)
    text, prompt, images = built_prompt(chat, loaded, plan)  # as /tokenize and count_tokens count it
    # Output held to a grammar (a forced tool call, a JSON schema) has no thinking to split off.
    constrained = plan.mode == "forced" or chat.json_schema() is not None
    reasoning = None if constrained else reasoning_plan(loaded.tokenizer, text)
    streams = submit_all(
        chat,
        loaded,
        [prompt],
        chat.max_completion_tokens or chat.max_tokens,
        param,
        constraint_factory(chat, loaded, plan),
        images,
    )
    return Started(loaded, plan, prompt, streams, reasoning)


def collect_answer(
    started: Started, streams: Sequence[EventSource] | None = None
) -> tuple[str, list[ToolCall], TokenEvent, str | None]:
    """The first choice read to its end: its text, tool calls, final event and reasoning (None for a
    model that does not think). ``streams``: what to read instead of ``started.streams`` (the
    Responses API reads the first through a LogprobTap)."""
    choices = started.streams if streams is None else streams
    text: list[str] = []
    thought: list[str] = []
    splitter = started.reasoning.splitter() if started.reasoning else None
    try:
        for kind, value in answer_parts(started.plan, choices[0], splitter):
            if kind == "error":
                raise APIError(500, value, code="generation_failed")
            if kind == "text":
                text.append(value)
            elif kind == "reasoning":
                thought.append(value)
            else:
                calls, last = value
    finally:
        cancel_all(choices)
    return "".join(text), calls, last, "".join(thought) or None


def chat_completion(body: ChatCompletionRequest, started: Started, meta: dict[str, Any]) -> ChatCompletion:
    """Every choice read to its end, as one ``ChatCompletion`` (its tool calls split from its text)."""
    loaded, plan = started.loaded, started.plan
    choices = []
    results = collect(started.streams)
    for i, r in enumerate(results):
        reasoning, answer = split_reasoning(started.reasoning, r.text)
        content, calls, complete = split_answer(plan, answer)
        choices.append(
            ChatChoice(
                index=i,
                message=AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls or None),
                finish_reason=finish_reason(calls, complete, r.finish_reason),
                logprobs=chat_logprobs(r.logprobs, loaded.tokenizer) if body.logprobs else None,
            )
        )
    total = usage(len(started.prompt), sum(r.completion_tokens for r in results))
    return ChatCompletion(**meta, choices=choices, usage=total)


def chat_meta(started: Started) -> dict[str, Any]:
    """The response's id (``chatcmpl-...``), creation time, model and fingerprint."""
    return request_meta("chatcmpl", started.loaded)


def chat_chunks(body: ChatCompletionRequest, started: Started, meta: dict[str, Any]) -> Iterator[str]:
    """The chat completion's chunks: a role delta per choice, its text (or tool calls, sent whole
    once complete), its finish reason, and the usage when ``stream_options`` asks for it. The events
    of tokens that reached the reader together go out as one write (generation.waiting), and a
    plain text delta is rendered from its choice's template (sse.TextChunk)."""
    streams, prompt_tokens, loaded, plan = started.streams, len(started.prompt), started.loaded, started.plan
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    logprobs = body.logprobs

    def chunk(index: int, delta: ChatDelta, finish: str | None = None, lp: ChatLogprobs | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=lp)
        return sse(chunk_payload(ChatCompletionChunk(**meta, choices=[choice]), include_usage))

    def call_deltas(calls: list[ToolCall]) -> ChatDelta:
        return ChatDelta(tool_calls=[DeltaToolCall(index=n, **c.model_dump()) for n, c in enumerate(calls)])

    def text_chunk(index: int, text: str) -> str:
        return chunk(index, ChatDelta(content=text))

    texts = [TextChunk(partial(text_chunk, index)) for index in range(len(streams))]
    completion_tokens = 0
    begun: set[int] = set()
    splitter = ToolCallSplitter(plan)
    thinking = started.reasoning.splitter() if started.reasoning else None
    forced_text: list[str] = []

    def render(index: int, event: TokenEvent) -> list[str]:  # one choice after the other
        nonlocal completion_tokens, splitter, thinking, forced_text
        out: list[str] = []
        if index not in begun:
            begun.add(index)
            splitter = ToolCallSplitter(plan)
            thinking = started.reasoning.splitter() if started.reasoning else None
            forced_text = []
            out.append(chunk(index, ChatDelta(role="assistant", content="")))
        if event.error:
            return out
        answer = event.text
        if thinking is not None:
            thought, answer = thinking.feed(event.text, final=event.done)
            if thought:
                out.append(chunk(index, ChatDelta(reasoning_content=thought)))
        if plan.mode == "forced":
            forced_text.append(answer)  # one call, sent whole once it is complete
            text = ""
        elif plan.mode == "auto":
            text = splitter.feed(answer, final=event.done)
        else:
            text = answer
        if text or (logprobs and event.logprobs):
            if logprobs:
                out.append(chunk(index, ChatDelta(content=text), lp=chat_logprobs(event.logprobs, loaded.tokenizer)))
            else:
                out.append(texts[index](text))
        if event.finish_reason:
            completion_tokens += event.completion_tokens
            calls, complete = (
                split_answer(plan, "".join(forced_text))[1:] if plan.mode == "forced" else (splitter.calls, True)
            )
            if calls:
                out.append(chunk(index, call_deltas(calls)))
            out.append(chunk(index, ChatDelta(), finish_reason(calls, complete, event.finish_reason)))
        return out

    def tail() -> list[str]:
        if not include_usage:
            return []
        return [
            sse(ChatCompletionChunk(**meta, choices=[], usage=usage(prompt_tokens, completion_tokens)).model_dump())
        ]

    yield from writes(streams, render, tail)
