"""OpenAI's Responses API (/v1/responses) as a translation layer over the chat path: input items
become chat messages, the answer becomes output items and Responses stream events. ``store: true``
keeps a response for ``previous_response_id`` and GET/DELETE (serving/response_store.py).
Fields the SDKs send are honoured (``include`` logprobs, ``parallel_tool_calls``), accepted where they
cannot change the answer, or refused where ignoring them would mislead: docs/clients.md, "Fields the
SDKs send"."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gerdsen_ai_server.engine.protocol import EventSource, TokenEvent, TokenLogprob, TokenStream
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, ToolCall
from gerdsen_ai_server.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    InputMessage,
    ReasoningItem,
    ResponseObject,
    ResponsesRequest,
)
from gerdsen_ai_server.serving.chat import Started, collect_answer, start_chat
from gerdsen_ai_server.serving.generation import cancel_all
from gerdsen_ai_server.serving.images import input_content, label_images
from gerdsen_ai_server.serving.logprobs import chat_logprobs
from gerdsen_ai_server.serving.reasoning import ReasoningSplitter
from gerdsen_ai_server.serving.response_store import Keep, Owner, stateful
from gerdsen_ai_server.serving.running import ClientGone
from gerdsen_ai_server.serving.sse import coalesced
from gerdsen_ai_server.serving.tools import ToolPlan, answer_parts

# Why each known field we cannot honour is refused rather than ignored (docs/clients.md).
REFUSED = {
    "conversation": "This server keeps no conversations; send the whole conversation as input instead.",
    "prompt": "This server has no stored prompt templates; send the instructions and input instead.",
    "context_management": "This server does not compact conversations; send a shorter input instead.",
    "background": "This server does not run responses in the background (they could not be retrieved later).",
    "moderation": "This server runs no moderation model; the output would not be checked.",
    "text.verbosity": "The models served here have no verbosity control; only 'medium' is supported.",
}


def to_openai(body: ResponsesRequest) -> ChatCompletionRequest:
    name = body.unsupported()
    if name is not None:
        message = REFUSED.get(
            name, f"'{name}' is not supported with the models served here (they have no reasoning controls)."
        )
        raise APIError(400, message, param=name, code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true.", param="stream_options", code="invalid_value"
        )
    messages: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for k, item in enumerate(items):
        if isinstance(item, dict):
            messages.append(item)
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages[-1].setdefault("tool_calls", []).append(call)  # parallel calls share one turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        elif isinstance(item, ReasoningItem):
            continue  # earlier turns' thinking stays out of the prompt (schemas/responses.py)
        else:
            messages.append({"role": item.role, "content": input_content(item, f"input.{k}")})  # images as parts
    request: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.reasoning is not None and body.reasoning.effort is not None:  # to the template, as chat's
        request["reasoning_effort"] = body.reasoning.effort
    if body.logprob_count() is not None:  # include message.output_text.logprobs, or top_logprobs
        request["logprobs"], request["top_logprobs"] = True, body.logprob_count()
    for ours, theirs in (
        ("max_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("parallel_tool_calls", body.parallel_tool_calls),
    ):
        if theirs is not None:
            request[ours] = theirs
    if body.tools:
        request["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type", "strict"}, exclude_none=True)}
            for t in body.tools
        ]
    if body.tool_choice is not None:
        choice = body.tool_choice
        request["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format of type json_schema needs a schema.", param="text.format.schema")
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict},
        }
    elif fmt is not None and fmt.type == "json_object":
        request["response_format"] = {"type": "json_object"}
    places = [  # each input_image's place, for errors about it (serving/images.py)
        f"input.{k}.content.{j}"
        for k, item in enumerate(items)
        if isinstance(item, InputMessage) and not isinstance(item.content, str)
        for j, part in enumerate(item.content)
        if isinstance(part, InputImage)
    ]
    return label_images(ChatCompletionRequest.model_validate(request), places)


class Rendering:
    """Builds the response object and its output items as the answer arrives."""

    def __init__(self, body: ResponsesRequest, model: str, prompt_tokens: int, keep: Keep | None = None) -> None:
        self.body, self.model, self.prompt_tokens = body, model, prompt_tokens
        self.keep = keep  # stores the final response (store: true, serving/response_store.py)
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.text: list[str] = []
        self.reasoning: list[str] = []  # a thinking model's reasoning (serving/reasoning.py)
        self.reasoning_id = f"rs_{uuid.uuid4().hex[:24]}"
        self.reasoning_tokens = 0  # set once the answer is complete (``count_reasoning``)
        self.logprobs: list[dict[str, Any]] = []  # the text's, when asked for (include / top_logprobs)

    def message_item(self, status: str = "completed") -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": self.logprobs}]
            if status == "completed"
            else []
        )
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def reasoning_item(self, status: str = "completed") -> dict[str, Any]:
        """The reasoning item (vLLM's shape: the raw text as ``reasoning_text`` content, no summary)."""
        text = "".join(self.reasoning) if status != "in_progress" else ""
        content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def count_reasoning(self, tokenizer: Any) -> None:
        """``usage.output_tokens_details.reasoning_tokens``: the reasoning text's tokens."""
        self.reasoning_tokens = len(tokenizer.encode("".join(self.reasoning), add_special_tokens=False))

    @staticmethod
    def call_item(call: ToolCall, arguments: str | None = None, status: str = "completed") -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_{call.id.removeprefix('call_')}",
            "call_id": call.id,
            "name": call.function.name,
            "arguments": call.function.arguments if arguments is None else arguments,
            "status": status,
        }

    def response(
        self, status: str, output: list[dict[str, Any]], completion_tokens: int = 0, finish: str | None = None
    ) -> dict[str, Any]:
        body = self.body
        incomplete = status == "incomplete"
        return ResponseObject.model_validate(
            {
                "id": self.id,
                "object": "response",
                "created_at": self.created,
                "status": status,
                "model": self.model,
                "output": output,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "parallel_tool_calls": body.parallel_tool_calls is not False,
                "tool_choice": (
                    body.tool_choice
                    if isinstance(body.tool_choice, str) or body.tool_choice is None
                    else body.tool_choice.model_dump()
                )
                or "auto",
                "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
                "text": body.text.model_dump(by_alias=True, exclude_none=True)
                if body.text
                else {"format": {"type": "text"}},
                "store": self.keep is not None,
                "metadata": body.metadata or {},
                "previous_response_id": body.previous_response_id,
                "user": body.user,
                "usage": {
                    "input_tokens": self.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                    "total_tokens": self.prompt_tokens + completion_tokens,
                },
            }
        ).model_dump(mode="json")  # through the documented model: the answer cannot drift from /openapi.json

    def reasoning_status(self, calls: list[ToolCall], last: Any) -> str:
        """ "incomplete" for reasoning cut by max_output_tokens (nothing after it), else "completed"."""
        return "incomplete" if last.finish_reason == "length" and not self.text and not calls else "completed"

    def final(self, calls: list[ToolCall], last: Any) -> dict[str, Any]:
        # "length" with calls: a forced call cut by max_output_tokens (serving/tools.py), an incomplete item.
        status = "incomplete" if last.finish_reason == "length" else "completed"
        output = [self.reasoning_item(self.reasoning_status(calls, last))] if self.reasoning else []
        output += ([self.message_item()] if self.text else []) + [self.call_item(c, status=status) for c in calls]
        response = self.response(status, output, last.completion_tokens)
        return self.keep(response) if self.keep else response


class LogprobTap:
    """A choice's events, keeping the log-probabilities that ``answer_parts`` drops: what
    ``include: ["message.output_text.logprobs"]`` returns with the text they came with."""

    def __init__(self, stream: TokenStream, tokenizer: Any) -> None:
        self.stream, self.tokenizer = stream, tokenizer
        self.pending: list[TokenLogprob] = []

    def __iter__(self) -> Iterator[TokenEvent]:
        for event in self.stream:
            self.pending += event.logprobs
            yield event

    def cancel(self) -> None:
        self.stream.cancel()

    def take(self) -> list[dict[str, Any]]:
        """The log-probabilities read since the last call, in the Responses shape."""
        entries, self.pending = self.pending, []
        return [token.model_dump() for token in chat_logprobs(entries, self.tokenizer).content or []]


@dataclass
class ResponseRun:
    """A response under way: what renders it, the chat it runs as, and the log-probability tap
    when ``include``/``top_logprobs`` asks for them."""

    rendering: Rendering
    started: Started
    tap: LogprobTap | None
    streams: list[EventSource]  # started's streams, the first read through the tap when there is one


def start_response_chat(body: ResponsesRequest) -> Started:
    """The chat a response runs as; a reasoning effort the model cannot take is named as
    Responses spells it (``reasoning.effort``)."""
    try:
        return start_chat(to_openai(body), "input")
    except APIError as exc:
        if exc.param == "reasoning_effort":
            exc.param = "reasoning.effort"
            exc.message = exc.message.replace("'reasoning_effort'", "'reasoning.effort'")
        raise


def start_response(body: ResponsesRequest, owner: Owner) -> ResponseRun:
    full, keep = stateful(body, owner)  # previous_response_id's conversation first; store: true
    started = start_response_chat(full)
    rendering = Rendering(body, started.loaded.model_id, len(started.prompt), keep)
    tap = None
    streams: list[EventSource] = list(started.streams)
    if body.logprob_count() is not None:
        tap = LogprobTap(started.streams[0], started.loaded.tokenizer)
        streams[0] = tap
    return ResponseRun(rendering, started, tap, streams)


def final_response(run: ResponseRun) -> dict[str, Any]:
    """The answer read to its end, as one response object."""
    text, calls, last, reasoning = collect_answer(run.started, run.streams)
    if reasoning:
        run.rendering.reasoning.append(reasoning)
        run.rendering.count_reasoning(run.started.loaded.tokenizer)
    if text:
        run.rendering.text.append(text)
        run.rendering.logprobs = run.tap.take() if run.tap else []
    return run.rendering.final(calls, last)


def response_events(run: ResponseRun) -> Iterator[str]:
    started = run.started
    splitter = started.reasoning.splitter() if started.reasoning else None
    events = stream_events(run.rendering, started.plan, run.streams, run.tap, splitter, started.loaded.tokenizer)
    return coalesced(events, started.streams[0])  # fewer writes (IMPETUS_STREAM_COALESCE_MS)


def stream_events(
    r: Rendering,
    plan: ToolPlan,
    streams: list[Any],
    tap: LogprobTap | None = None,
    reasoning: ReasoningSplitter | None = None,
    tokenizer: Any = None,
) -> Iterator[str]:
    """The Responses events. A thinking model's reasoning comes first as its own output item:
    ``output_item.added``, ``content_part.added`` (a ``reasoning_text`` part), ``reasoning_text.delta``
    events, then ``reasoning_text.done``, ``content_part.done`` and ``output_item.done`` (vLLM's
    sequence; vLLM names the part events ``reasoning_part.*``, OpenAI's SDK ``content_part.*``)."""
    sequence = 0

    def event(kind: str, **payload: Any) -> str:
        nonlocal sequence
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence - 1, **payload})}\n\n"

    try:
        yield event("response.created", response=r.response("in_progress", []))
        yield event("response.in_progress", response=r.response("in_progress", []))
        where = {"item_id": r.message_id, "output_index": 0, "content_index": 0}
        thinking = {"item_id": r.reasoning_id, "output_index": 0, "content_index": 0}
        index, thinking_open = 0, False  # index: the next output item's
        for kind, value in answer_parts(plan, streams[0], reasoning):
            if kind == "error":
                yield event("error", code="generation_failed", message=value, param=None)
                return
            if kind == "reasoning":
                if not thinking_open:
                    thinking_open = True
                    yield event("response.output_item.added", output_index=0, item=r.reasoning_item("in_progress"))
                    yield event("response.content_part.added", **thinking, part={"type": "reasoning_text", "text": ""})
                r.reasoning.append(value)
                yield event("response.reasoning_text.delta", **thinking, delta=value)
                continue
            if thinking_open:  # the reasoning is over (the answer begins, or the output ends)
                thinking_open, thought = False, "".join(r.reasoning)
                status = "completed" if kind == "text" else r.reasoning_status(*value)
                yield event("response.reasoning_text.done", **thinking, text=thought)
                yield event("response.content_part.done", **thinking, part={"type": "reasoning_text", "text": thought})
                yield event("response.output_item.done", output_index=0, item=r.reasoning_item(status))
                index = 1
                where["output_index"] = 1
            if kind == "text":
                if not r.text:
                    yield event("response.output_item.added", output_index=index, item=r.message_item("in_progress"))
                    yield event(
                        "response.content_part.added",
                        **where,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )
                r.text.append(value)
                logprobs = tap.take() if tap else []
                r.logprobs += logprobs
                yield event("response.output_text.delta", **where, delta=value, logprobs=logprobs)
                continue
            calls, last = value
            if r.text:
                text = "".join(r.text)
                yield event("response.output_text.done", **where, text=text, logprobs=r.logprobs)
                yield event(
                    "response.content_part.done",
                    **where,
                    part={"type": "output_text", "text": text, "annotations": [], "logprobs": r.logprobs},
                )
                yield event("response.output_item.done", output_index=index, item=r.message_item())
                index += 1
            for call in calls:
                item = r.call_item(call, status="incomplete" if last.finish_reason == "length" else "completed")
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**r.call_item(call, ""), "status": "in_progress"},
                )
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=item["arguments"],
                )
                yield event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
                yield event("response.output_item.done", output_index=index, item=item)
                index += 1
            if r.reasoning and tokenizer is not None:
                r.count_reasoning(tokenizer)
            final = r.final(calls, last)
            yield event(
                "response.completed" if final["status"] == "completed" else "response.incomplete", response=final
            )
    except ClientGone:
        return  # nobody to tell
    except APIError as exc:  # the deadline, or an operator's cancel (serving/running.py)
        yield event("error", code=exc.code, message=exc.message, param=exc.param)
    finally:
        cancel_all(streams)
