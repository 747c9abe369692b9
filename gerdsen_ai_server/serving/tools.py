"""Tool calling: tools into the prompt, tool calls out of the generated text.

* ``tool_choice`` ``required`` or a named function: the output is constrained (llguidance) to a
  JSON call of an offered function, its arguments held to the function's schema with OpenAI's strict
  semantics (engine/grammar.py: no undeclared keys), so any model returns a valid call. A call cut
  by ``max_tokens`` still comes back as a call, with the arguments generated so far and finish
  reason ``length`` (``ForcedAnswer``), on every API: clients report it as an invalid call.
* ``auto``: the model decides; calls are found between the tokenizer's tool-call markers and
  parsed by mlx-lm's parser for that model family. Models whose chat template knows no tools get
  the functions and the ``<tool_call>{json}</tool_call>`` convention in a system message.
* ``none`` (or no tools): plain chat.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mlx_lm.tool_parsers.json_tools import parse_tool_call as parse_json_call
from pydantic_core import from_json

from gerdsen_ai_server.engine.grammar import map_schema, strict_schema
from gerdsen_ai_server.engine.protocol import TokenEvent
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.limits import MAX_JSON_DEPTH, check_json_value, reject_constant
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall
from gerdsen_ai_server.serving.reasoning import ReasoningSplitter

START, END = "<tool_call>", "</tool_call>"


@dataclass
class ToolPlan:
    mode: Literal["none", "auto", "forced"]
    tools: list[dict[str, Any]] = field(default_factory=list)
    start: str = START
    end: str = END
    parser: Any = parse_json_call
    schema: dict[str, Any] | None = None  # what a forced call must match
    names: list[str] = field(default_factory=list)  # the functions a forced call may name, in order
    parallel: bool = True  # False (parallel_tool_calls: false): at most one call, later ones dropped


def plan_tools(body: ChatCompletionRequest, tokenizer: Any) -> ToolPlan:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools.", param="tool_choice", code="invalid_value")
        return ToolPlan("none")
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if choice == "none":
        return ToolPlan("none")
    plan = ToolPlan("auto", tools, parallel=body.parallel_tool_calls is not False)
    if getattr(tokenizer, "has_tool_calling", False):
        plan.start, plan.end, plan.parser = tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser
    if choice in (None, "auto"):
        return plan
    offered = {t.function.name: t.function for t in body.tools}
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in offered:
            raise APIError(
                400,
                f"tool_choice names '{choice.function.name}', which is not among the tools.",
                param="tool_choice",
                code="invalid_value",
            )
        offered = {choice.function.name: offered[choice.function.name]}
    single = len(offered) == 1
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                # The parameters sit inside the call's schema: their local $refs ("#/$defs/X") must point there.
                # ``parameters: {}`` (some clients' spelling of "no arguments") is an empty object, not "any JSON".
                "arguments": _rebase_refs(
                    fn.parameters or {"type": "object", "properties": {}},
                    ("" if single else f"/anyOf/{i}") + "/properties/arguments",
                ),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, (name, fn) in enumerate(offered.items())
    ]
    plan.mode, plan.names = "forced", list(offered)
    plan.schema = strict_schema(calls[0] if single else {"anyOf": calls})
    return plan


def _rebase_refs(schema: dict[str, Any], at: str) -> dict[str, Any]:
    """``schema`` moved to JSON pointer ``at`` of a larger document: local ``$ref``s follow it."""

    def rebase(sub: dict[str, Any], _: bool) -> dict[str, Any]:
        ref = sub.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            sub["$ref"] = "#" + at + ref[1:]
        return sub

    return map_schema(schema, rebase)  # type: ignore[no-any-return]


def template_messages(
    body: ChatCompletionRequest, plan: ToolPlan, tokenizer: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and extra template arguments for ``apply_chat_template``."""
    native = plan.mode != "none" and "tools" in str(getattr(tokenizer, "chat_template", "") or "")
    messages: list[dict[str, Any]] = []
    for m in body.messages:
        # Templates know "system", not OpenAI's newer "developer" role.
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.reasoning_content is not None and m.role == "assistant":  # Qwen3's template reads it
            message["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            if native:
                message["tool_calls"] = [
                    {"type": "function", "id": c.id, "function": call}
                    for c, call in zip(m.tool_calls, calls, strict=True)
                ]
            else:
                message["content"] += "".join(f"{plan.start}{json.dumps(call)}{plan.end}" for call in calls)
        if m.role == "tool":
            if native:
                message["tool_call_id"] = m.tool_call_id
            else:
                message = {"role": "user", "content": f"Result of tool call {m.tool_call_id or ''}: {m.text()}"}
        messages.append(message)
    if native:
        return messages, {"tools": plan.tools}
    if plan.mode != "none":
        instructions = (
            "You can call these functions. To call one, answer with "
            f'{plan.start}{{"name": <function name>, "arguments": <arguments object>}}{plan.end} '
            "and nothing else.\nFunctions:\n" + "\n".join(json.dumps(t["function"]) for t in plan.tools)
        )
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] += "\n\n" + instructions
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages, {}


def _arguments(text: str) -> Any:
    """A past tool call's arguments, parsed as strictly as a request body (schemas/limits.py): a
    string of 100,000 nested arrays was a RecursionError, a 500."""
    try:
        value = json.loads(text, parse_constant=reject_constant)
        check_json_value(value)
    except (ValueError, RecursionError):
        raise APIError(
            400,
            f"A tool call's arguments must be a JSON string (finite numbers, nested at most {MAX_JSON_DEPTH} levels).",
            param="messages",
            code="invalid_value",
        ) from None
    return value


def make_call(parsed: dict[str, Any]) -> ToolCall:
    arguments = parsed.get("arguments", {})
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(
            name=str(parsed["name"]), arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)
        ),
    )


# The grammar writes a forced call compactly, "name" first: {"name": "f", "arguments": {...}}.
_FORCED = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)(")?(?:, "arguments": (.*))?', re.DOTALL)


def forced_calls(plan: ToolPlan, text: str) -> tuple[list[ToolCall], bool]:
    """The constrained output's one call, and whether it is complete.

    A call cut short (``max_tokens``, or a stop string) is still returned as that call: its name is
    the offered function the generated prefix of the name matches (the first such, in the order
    offered, while the name itself is cut), its arguments the text generated so far (maybe ``""``).
    As OpenAI does on ``length``, so clients see a call they can report as invalid, not our wrapper
    as text."""
    try:
        return [make_call(json.loads(text))], True
    except (ValueError, KeyError, TypeError, RecursionError):  # model output: any JSON, or none
        pass
    match = _FORCED.match(text)
    prefix, closed, arguments = (match.group(1), match.group(2), match.group(3) or "") if match else ("", None, "")
    names = [n for n in plan.names if (n == prefix if closed else n.startswith(prefix))] or plan.names or [prefix]
    return [make_call({"name": names[0], "arguments": arguments})], False


def partial_arguments(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object, read as far as they go when ``max_tokens`` cut them
    (``{"a": 1, "b": "hel`` → ``{"a": 1, "b": "hel"}``); ``{}`` when nothing of an object is there.
    For Anthropic's ``tool_use.input``, which is an object, never a string."""
    # A cut literal or number ("tr", "-", "1.") fails the partial parser: drop it, a few characters at most.
    for end in range(len(arguments), max(len(arguments) - 8, 0), -1):
        try:
            value = from_json(arguments[:end], allow_partial="trailing-strings")
        except ValueError:
            continue
        return value if isinstance(value, dict) else {}
    return {}


class ToolCallSplitter:
    """Splits streamed text into content and tool-call texts between the start and end markers,
    holding back any tail that could be the start of a marker."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._buffer = ""
        self._inside = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> str:
        self._buffer += text
        out = []
        while True:
            marker = self.plan.end if self._inside else self.plan.start
            at = self._buffer.find(marker)
            if at < 0:
                break
            if self._inside:
                if not self._parse(self._buffer[:at]):  # not a call after all: nothing is lost
                    out.append(self.plan.start + self._buffer[:at] + self.plan.end)
            else:
                out.append(self._buffer[:at])
            self._buffer, self._inside = self._buffer[at + len(marker) :], not self._inside
        if final:
            if self._inside and not self._parse(self._buffer):  # cut by max_tokens
                out.append(self.plan.start + self._buffer)
            elif not self._inside:
                out.append(self._buffer)
            self._buffer = ""
        elif not self._inside:
            keep = next(
                (
                    k
                    for k in range(min(len(self._buffer), len(self.plan.start) - 1), 0, -1)
                    if self.plan.start.startswith(self._buffer[-k:])
                ),
                0,
            )
            out.append(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
        return "".join(out)

    def _parse(self, text: str) -> bool:
        try:
            parsed = self.plan.parser(text, self.plan.tools)
        except (ValueError, KeyError, TypeError, RecursionError):  # model output: any JSON, or none
            return False
        items = [i for i in (parsed if isinstance(parsed, list) else [parsed]) if isinstance(i, dict) and "name" in i]
        # parallel_tool_calls false: the first call only; a later one is dropped, not shown as text.
        self.calls += [make_call(item) for item in items][: None if self.plan.parallel else 1 - len(self.calls)]
        return bool(items)


def split_answer(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall], bool]:
    """Content and tool calls of a whole answer, and whether the calls are complete."""
    if plan.mode == "forced":
        calls, complete = forced_calls(plan, text)
        return None, calls, complete
    if plan.mode == "none":
        return text, [], True
    splitter = ToolCallSplitter(plan)
    content = splitter.feed(text, final=True)
    return (content or None) if splitter.calls else content, splitter.calls, True


def finish_reason(calls: list[ToolCall], complete: bool, finish: str | None) -> str | None:
    """What an answer reports: ``tool_calls`` for whole calls; otherwise the engine's reason
    (``length`` for a forced call cut by ``max_tokens``)."""
    return "tool_calls" if calls and complete else finish


def answer_parts(
    plan: ToolPlan, events: Iterable[TokenEvent], reasoning: ReasoningSplitter | None = None
) -> Iterator[tuple[str, Any]]:
    """A choice's events as ``("text", str)`` while it streams, then ``("end", (calls, last_event))``
    or ``("error", message)``: what every API shape (chat, Anthropic, Responses) renders. With a
    ``reasoning`` splitter (a thinking model), its thinking comes as ``("reasoning", str)`` parts
    and only the answer after it is text, where tool calls are looked for."""
    splitter = ToolCallSplitter(plan)
    forced: list[str] = []
    for event in events:
        if event.error:
            yield "error", event.error
            return
        content = event.text
        if reasoning is not None:
            thought, content = reasoning.feed(event.text, final=event.done)
            if thought:
                yield "reasoning", thought
        if plan.mode == "forced":
            forced.append(content)  # one call, sent whole once it is complete
        elif plan.mode == "auto":
            if text := splitter.feed(content, final=event.done):
                yield "text", text
        elif content:
            yield "text", content
        if event.done:
            calls, complete = (
                split_answer(plan, "".join(forced))[1:] if plan.mode == "forced" else (splitter.calls, True)
            )
            # The last event's finish reason is the answer's (``finish_reason``): "tool_calls" for
            # whole calls, "length" for a forced call cut short, so every API tells them apart.
            yield "end", (calls, replace(event, finish_reason=finish_reason(calls, complete, event.finish_reason)))
