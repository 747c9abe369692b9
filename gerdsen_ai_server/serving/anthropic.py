"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) as a translation layer:
the request becomes an OpenAI chat request and runs on the same engine path (prompt, tools,
constrained decoding, streams); the answer is rendered in Anthropic's shapes and events."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.anthropic import (
    CountTokensRequest,
    CountTokensResponse,
    ImageBlock,
    Message,
    MessageResponse,
    MessagesRequest,
    TextBlock,
    Usage,
)
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, ToolCall
from gerdsen_ai_server.serving.chat import Started, chat_prompt, collect_answer, start_chat
from gerdsen_ai_server.serving.generation import cancel_all
from gerdsen_ai_server.serving.images import check_images, label_images, require_vision
from gerdsen_ai_server.serving.models import resident_model
from gerdsen_ai_server.serving.presets import apply_preset
from gerdsen_ai_server.serving.reasoning import ReasoningSplitter
from gerdsen_ai_server.serving.running import ClientGone
from gerdsen_ai_server.serving.sse import coalesced
from gerdsen_ai_server.serving.tools import ToolPlan, answer_parts, partial_arguments, plan_tools

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def to_openai_messages(system: str | None, messages: list[Message]) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages. Thinking and redacted_thinking blocks replayed in
    assistant turns are dropped (Anthropic drops earlier turns' thinking too, and this model did not
    write them); cache_control and citations have no place in a prompt. Image blocks become
    ``image_url`` parts (a data: URL), in their place among the text."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        text: str | list[dict[str, Any]] = "".join(b.text for b in message.content if b.type == "text")
        if any(b.type == "image" for b in message.content):  # text and images in their order, as OpenAI parts
            text = [
                {"type": "image_url", "image_url": {"url": b.data_url()}}
                if isinstance(b, ImageBlock)
                else {"type": "text", "text": b.text}
                for b in message.content
                if isinstance(b, ImageBlock | TextBlock)
            ]
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in message.content
            if b.type == "tool_use"
        ]
        results = [
            {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
            for b in message.content
            if b.type == "tool_result"
        ]
        out += results  # tool results answer the previous assistant turn, before any new text
        if text or calls or not results:
            out.append({"role": message.role, "content": text, **({"tool_calls": calls} if calls else {})})
    return out


def thinking_enabled(body: MessagesRequest | CountTokensRequest) -> bool:
    """Whether the request asks for thinking (``enabled``, or ``adaptive``/``between_tools``: the
    model decides); ``disabled`` or absent: no thinking, as on Anthropic's side."""
    return body.thinking is not None and body.thinking.type != "disabled"


def thinking_signature(thinking: str) -> str:
    """A thinking block's ``signature``: the SHA-256 of its text (hex). Anthropic's is an opaque
    proof that the text is the model's; here it is only a checksum, and replayed blocks are not
    checked (they are dropped from the prompt)."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def thinking_block(body: MessagesRequest, reasoning: str | None) -> list[dict[str, Any]]:
    """The ``thinking`` block of an answer, when thinking was asked for and the model thought
    (``display: omitted``: the block without its text, as Anthropic sends it)."""
    if not thinking_enabled(body) or not reasoning:
        return []
    shown = "" if body.thinking is not None and body.thinking.display == "omitted" else reasoning
    return [{"type": "thinking", "thinking": shown, "signature": thinking_signature(reasoning)}]


def to_openai(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    request: dict[str, Any] = {"model": body.model, "messages": to_openai_messages(body.system_text(), body.messages)}
    # Thinking on or off through the template's switch (Qwen3's ``enable_thinking``); a template
    # without one ignores it, and a model that thinks anyway has its thinking kept out of the text.
    request["chat_template_kwargs"] = {"enable_thinking": thinking_enabled(body)}
    if body.tools:
        request["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.input_schema,
                    **({"strict": t.strict} if t.strict is not None else {}),
                },
            }
            for t in body.tools
        ]
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice of type 'tool' needs a name.", param="tool_choice")
            request["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            request["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            request["parallel_tool_calls"] = False
    output_format = body.output_config.format if body.output_config is not None else None
    if output_format is not None:  # structured outputs: the same constrained decoding as response_format
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": output_format.schema_, "strict": True},
        }
    if isinstance(body, MessagesRequest):
        request.update(max_tokens=body.max_tokens, temperature=body.temperature, stream=body.stream)
        if body.top_p is not None:
            request["top_p"] = body.top_p
        if body.top_k:
            request["top_k"] = body.top_k
        if body.stop_sequences:
            request["stop"] = body.stop_sequences
    places = [  # each image block's place, for errors about it (serving/images.py)
        f"messages.{i}.content.{j}"
        for i, m in enumerate(body.messages)
        if not isinstance(m.content, str)
        for j, b in enumerate(m.content)
        if isinstance(b, ImageBlock)
    ]
    return label_images(ChatCompletionRequest.model_validate(request), places)


def stop_reason(calls: list[ToolCall], finish: str | None, stop_sequence: str | None) -> str:
    if finish == "length":  # a forced call cut short too (serving/tools.py): its tool_use block holds what came
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence else "end_turn"


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id.replace("call_", "toolu_", 1),
        "name": call.function.name,
        "input": partial_arguments(call.function.arguments),
    }  # as far as they go, if max_tokens cut them


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def start_message(body: MessagesRequest) -> tuple[str, Started]:
    """The message's id, and its chat submitted to the engine."""
    return message_id(), start_chat(to_openai(body), "messages")


def message(body: MessagesRequest, msg_id: str, started: Started) -> MessageResponse:
    """The answer read to its end, as one message: its thinking block (when asked for), its text
    block, then its tool_use blocks."""
    text, calls, last, reasoning = collect_answer(started)
    content = thinking_block(body, reasoning)
    content += ([{"type": "text", "text": text}] if text else []) + [tool_use_block(c) for c in calls]
    return MessageResponse(
        id=msg_id,
        model=started.loaded.model_id,
        content=content,
        stop_reason=stop_reason(calls, last.finish_reason, last.stop_sequence),
        stop_sequence=last.stop_sequence,
        usage=Usage(input_tokens=len(started.prompt), output_tokens=last.completion_tokens),
    )


def message_events(msg_id: str, started: Started, body: MessagesRequest | None = None) -> Iterator[str]:
    splitter = started.reasoning.splitter() if started.reasoning else None
    events = stream_events(
        msg_id, started.loaded.model_id, len(started.prompt), started.plan, started.streams, splitter, body
    )
    return coalesced(events, started.streams[0])  # fewer writes (IMPETUS_STREAM_COALESCE_MS)


def event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n"


def stream_events(
    message_id: str,
    model: str,
    prompt_tokens: int,
    plan: ToolPlan,
    streams: list[Any],
    reasoning: ReasoningSplitter | None = None,
    body: MessagesRequest | None = None,
) -> Iterator[str]:
    """Anthropic's event sequence: message_start, content blocks (start / deltas / stop),
    message_delta with the stop reason and usage, message_stop. A thinking block comes first, as
    Anthropic streams it: ``thinking_delta`` events, then one ``signature_delta`` before its stop;
    only when the request enabled thinking (else the model's thinking is dropped)."""
    show = body is not None and thinking_enabled(body)
    omitted = body is not None and body.thinking is not None and body.thinking.display == "omitted"
    thought: list[str] = []
    try:
        yield event(
            "message_start",
            {
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
                }
            },
        )
        index, text_open, thinking_open = 0, False, False
        for kind, value in answer_parts(plan, streams[0], reasoning):
            if kind == "error":
                yield event("error", {"error": {"type": "api_error", "message": value}})
                return
            if kind == "reasoning":
                if not show:
                    continue
                if not thinking_open:
                    block = {"type": "thinking", "thinking": "", "signature": ""}
                    yield event("content_block_start", {"index": index, "content_block": block})
                    thinking_open = True
                thought.append(value)
                if not omitted:
                    yield event(
                        "content_block_delta", {"index": index, "delta": {"type": "thinking_delta", "thinking": value}}
                    )
                continue
            if thinking_open:  # the thinking is over: its signature, then the block's end
                signature = thinking_signature("".join(thought))
                yield event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "signature_delta", "signature": signature}},
                )
                yield event("content_block_stop", {"index": index})
                index, thinking_open = index + 1, False
            if kind == "text":
                if not text_open:
                    yield event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": value}})
                continue
            calls, last = value
            if text_open:
                yield event("content_block_stop", {"index": index})
                index += 1
            for call in calls:
                block = tool_use_block(call)
                yield event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                yield event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "input_json_delta", "partial_json": call.function.arguments}},
                )
                yield event("content_block_stop", {"index": index})
                index += 1
            yield event(
                "message_delta",
                {
                    "delta": {
                        "stop_reason": stop_reason(calls, last.finish_reason, last.stop_sequence),
                        "stop_sequence": last.stop_sequence,
                    },
                    "usage": {"output_tokens": last.completion_tokens},
                },
            )
            yield event("message_stop", {})
    except ClientGone:
        return  # nobody to tell
    except APIError as exc:  # the deadline, or an operator's cancel (serving/running.py)
        yield event("error", {"error": {"type": ERROR_TYPES.get(exc.status, "api_error"), "message": exc.message}})
    finally:
        cancel_all(streams)  # a client that went away frees its slot


def count_tokens(body: CountTokensRequest) -> CountTokensResponse:
    """The prompt's length as this model's chat template renders it, tools and each image's tokens
    included (serving/chat.py ``chat_prompt``): the ``usage.input_tokens`` of the same /v1/messages."""
    chat = apply_preset(to_openai(body))  # a preset's system message counts, as /v1/messages sends it
    check_images(chat)  # the bounds, then the answer for a text model given an image, as /v1/messages
    loaded = resident_model(chat.model)
    require_vision(chat, loaded)
    return CountTokensResponse(input_tokens=len(chat_prompt(chat, loaded, plan_tools(chat, loaded.tokenizer))))
