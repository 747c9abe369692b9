"""Strict structured output (issue 24, item 2), through the official SDKs against the real server.

Schemas of forced tool calls, ``response_format`` ``json_schema`` and Responses ``text.format`` are
held to OpenAI's strict semantics: an object without ``additionalProperties`` takes no undeclared key
(LangChain's standard tests got ``{"input": 3, "exclusiveMaximum": 1000, ...}`` and, for a tool with
no arguments, ``{"properties": {"type": "object"}}``). A forced call cut by ``max_tokens`` is a call
with partial arguments and a "length" finish on every route, never our wrapper as text.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server

# LangChain's standard-test tool: a bounded integer, annotations the grammar must ignore, no additionalProperties.
BOUNDED = {
    "type": "object",
    "title": "magic_function",
    "description": "Applies a magic function to an input.",
    "properties": {
        "input": {
            "type": "integer",
            "exclusiveMinimum": -1,
            "exclusiveMaximum": 1000,
            "description": "The input.",
            "title": "Input",
        }
    },
    "required": ["input"],
}
NO_ARGS = {"type": "object", "properties": {}}
NESTED = {
    "type": "object",
    "properties": {
        "person": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
        }
    },
    "required": ["person"],
}
CHOICES = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["C", "F"]},
        "kind": {"const": "reading"},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 99},
        "label": {"type": "string", "maxLength": 8, "nullable": True},
    },
    "required": ["unit", "kind", "note", "count", "label"],
}
REFS = {
    "type": "object",
    "$defs": {
        "Point": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -9, "maximum": 9},
                "y": {"type": "integer", "minimum": -9, "maximum": 9},
            },
            "required": ["x", "y"],
        }
    },
    "properties": {"start": {"$ref": "#/$defs/Point"}, "end": {"$ref": "#/$defs/Point"}},
    "required": ["start", "end"],
}
SCHEMAS = {"bounded": BOUNDED, "no_args": NO_ARGS, "nested": NESTED, "choices": CHOICES, "refs": REFS}
TOOLS = [
    {"type": "function", "function": {"name": f"tool_{name}", "description": f"The {name} tool.", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "Call the tool for me with the input 3, please."}]
TEMPERATURES = [(0.0, 1), (1.0, 7)]  # (temperature, seed)


def strict_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """Why ``value`` fails ``schema`` read with OpenAI's strict semantics (absent additionalProperties
    means none): a small validator for the keywords these tests use (jsonschema is not installed)."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return strict_errors(value, target, root, at)
    if "anyOf" in schema:
        return (
            [] if any(not strict_errors(value, s, root, at) for s in schema["anyOf"]) else [f"{at}: no anyOf matches"]
        )
    errors: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if schema.get("nullable"):
            kinds = [*kinds, "null"]
        checks = {
            "object": lambda v: isinstance(v, dict),
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "null": lambda v: v is None,
        }
        if not any(checks[k](value) for k in kinds):
            return [f"{at}: {value!r} is not {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} not in enum")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: {value!r} is not the const")
    if isinstance(value, int) and not isinstance(value, bool):
        for key, ok in (
            ("minimum", lambda b: value >= b),
            ("maximum", lambda b: value <= b),
            ("exclusiveMinimum", lambda b: value > b),
            ("exclusiveMaximum", lambda b: value < b),
        ):
            if key in schema and not ok(schema[key]):
                errors.append(f"{at}: {value} breaks {key} {schema[key]}")
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        errors.append(f"{at}: longer than {schema['maxLength']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{at}: missing {name}" for name in schema.get("required", []) if name not in value]
        if schema.get("additionalProperties", False) is False:
            errors += [f"{at}: undeclared key {key!r}" for key in value if key not in properties]
        for key, item in value.items():
            if key in properties:
                errors += strict_errors(item, properties[key], root, f"{at}.{key}")
    return errors


def assert_valid(text: str | dict[str, Any], schema: dict[str, Any]) -> None:
    value = json.loads(text) if isinstance(text, str) else text
    assert strict_errors(value, schema, schema) == [], value


def test_the_validator_catches_what_the_issue_saw() -> None:
    """The helper itself: today's answers fail it."""
    assert strict_errors(
        {"input": 3, "exclusiveMaximum": 1000, "exclusiveMinimum": -1, "type": "integer"}, BOUNDED, BOUNDED
    )
    assert strict_errors({"properties": {"type": "object"}}, NO_ARGS, NO_ARGS)
    assert strict_errors({"start": {"x": 1, "y": 2}, "end": {"x": 1}}, REFS, REFS)
    assert not strict_errors(
        {"unit": "C", "kind": "reading", "note": None, "count": None, "label": None}, CHOICES, CHOICES
    )


@pytest.mark.parametrize("temperature,seed", TEMPERATURES)
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_forced_tool_calls_validate_strictly(client, name: str, temperature: float, seed: int) -> None:  # type: ignore[no-untyped-def]
    """A named function among all five tools."""
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=temperature,
        tool_choice={"type": "function", "function": {"name": f"tool_{name}"}},
        seed=seed,
        max_tokens=120,
    )
    assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == f"tool_{name}"
    assert_valid(call.function.arguments, SCHEMAS[name])


@pytest.mark.parametrize("temperature,seed", TEMPERATURES)
def test_required_among_many_tools_validates_the_chosen_one(client, temperature: float, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Several tools: the call schema is an anyOf of calls, whose $refs must still resolve."""
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=temperature,
        seed=seed,
        max_tokens=120,
    )
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert_valid(call.function.arguments, SCHEMAS[call.function.name.removeprefix("tool_")])


@pytest.mark.parametrize("temperature,seed", TEMPERATURES)
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates_strictly(
    client, server: Server, name: str, temperature: float, seed: int
) -> None:  # type: ignore[no-untyped-def]
    """``response_format`` json_schema (strict unset, as LangChain sends it) and Responses ``text.format``."""
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask,
        temperature=temperature,
        seed=seed,
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert_valid(reply.choices[0].message.content, SCHEMAS[name])
    if temperature == 0:
        return  # Responses shares the path: once per schema keeps the suite cheap
    response = client.responses.create(
        model=DEFAULT_MODEL,
        input="Describe a person as JSON.",
        temperature=temperature,
        max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": name, "schema": SCHEMAS[name]}},
    )
    assert response.status == "completed"
    assert_valid(response.output_text, SCHEMAS[name])


@pytest.mark.parametrize("name,choice", [("bounded", "tool"), ("no_args", "tool"), ("refs", "any")])
def test_anthropic_forced_tool_use_validates_strictly(server: Server, name: str, choice: str) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    tool_choice = {"type": "tool", "name": f"tool_{name}"} if choice == "tool" else {"type": "any"}
    message = claude.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=120,
        messages=ASK,
        tools=tools,  # type: ignore[arg-type]
        tool_choice=tool_choice,
        extra_body={"temperature": 1.0},
    )  # type: ignore[arg-type]
    assert message.stop_reason == "tool_use"
    block = next(b for b in message.content if b.type == "tool_use")
    assert_valid(block.input, SCHEMAS[block.name.removeprefix("tool_")])


def test_unenforceable_keywords_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    """A keyword the grammar cannot enforce is a 400, as in OpenAI's strict mode, not silently dropped."""
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=ASK,
            max_tokens=5,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "s",
                    "schema": {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
                },
            },
        )
    assert info.value.body["param"] == "response_format"


# A forced call cut by max_tokens: 3 tokens end inside the name, 14 inside the arguments.
CUT = [3, 14]
MAGIC = {"type": "function", "function": {"name": "magic_function", "parameters": BOUNDED}}
OTHER = {"type": "function", "function": {"name": "magic_other", "parameters": NESTED}}


@pytest.mark.parametrize("max_tokens", CUT)
@pytest.mark.parametrize("stream", [False, True])
def test_cut_forced_call_is_a_call_with_length_on_chat(client, stream: bool, max_tokens: int) -> None:  # type: ignore[no-untyped-def]
    args = dict(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[MAGIC, OTHER],
        max_tokens=max_tokens,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "magic_function"}},
    )
    if stream:
        chunks = list(client.chat.completions.create(**args, stream=True))
        deltas = [
            tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls
        ]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
        finish = chunks[-1].choices[0].finish_reason
        name, arguments = deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas)
        assert deltas[0].id.startswith("call_")
    else:
        reply = client.chat.completions.create(**args)
        assert reply.choices[0].message.content is None
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
        assert len(calls) == 1
        name, arguments = calls[0].function.name, calls[0].function.arguments
    assert (finish, name) == ("length", "magic_function")
    assert '"name"' not in arguments  # the arguments, not our wrapper
    if max_tokens > 3:
        assert arguments.startswith('{"input": ') or arguments.startswith("{"), arguments


@pytest.mark.parametrize("max_tokens", CUT)
def test_cut_forced_call_on_required_names_an_offered_function(client, max_tokens: int) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[MAGIC, OTHER],
        temperature=0,
        max_tokens=max_tokens,
        tool_choice="required",
    )
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content is None
    assert reply.choices[0].message.tool_calls[0].function.name in ("magic_function", "magic_other")


@pytest.mark.parametrize("stream", [False, True])
def test_cut_forced_call_is_tool_use_with_max_tokens_on_messages(server: Server, stream: bool) -> None:
    """Documented shape: ``stop_reason: "max_tokens"`` and one ``tool_use`` block whose ``input`` is
    the partial arguments parsed as far as they go (``{}`` when none is whole)."""
    claude = anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)
    args: dict[str, Any] = dict(
        model=DEFAULT_MODEL,
        max_tokens=14,
        messages=ASK,
        extra_body={"temperature": 0},
        tools=[{"name": "magic_function", "input_schema": BOUNDED}],
        tool_choice={"type": "tool", "name": "magic_function"},
    )
    if stream:
        with claude.messages.stream(**args) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(**args)
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["tool_use"]
    block = message.content[0]
    assert block.name == "magic_function" and block.id.startswith("toolu_") and isinstance(block.input, dict)
    assert set(block.input) <= {"input"}


@pytest.mark.parametrize("stream", [False, True])
def test_cut_forced_call_is_an_incomplete_function_call_on_responses(client, server: Server, stream: bool) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": DEFAULT_MODEL,
        "input": ASK[0]["content"],
        "max_output_tokens": 14,
        "temperature": 0,
        "tools": [{"type": "function", "name": "magic_function", "parameters": BOUNDED}],
        "tool_choice": {"type": "function", "name": "magic_function"},
    }
    if stream:
        with requests.post(f"{server.base_url}/responses", json={**body, "stream": True}, stream=True, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert events[-1]["type"] == "response.incomplete"
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert [i["status"] for i in done] == ["incomplete"]
        response = events[-1]["response"]
    else:
        response = client.responses.create(**body).model_dump()
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [(i["type"], i["name"], i["status"]) for i in response["output"]] == [
        ("function_call", "magic_function", "incomplete")
    ]
    assert '"name"' not in response["output"][0]["arguments"]


def test_strict_schema_reads_keywords_not_property_names() -> None:
    """In-process: properties named like keywords are left alone; allOf members keep JSON Schema's default."""
    from gerdsen_ai_server.engine.grammar import strict_schema

    schema = {
        "type": "object",
        "properties": {"type": {"type": "object", "properties": {}}, "$ref": {"type": "string", "nullable": True}},
        "$defs": {"Free": {"type": "object", "additionalProperties": True}},
        "anyOf": [{"allOf": [{"type": "object", "properties": {"a": {}}}, {"properties": {"b": {}}}]}],
    }
    out = strict_schema(schema)
    assert out["additionalProperties"] is False and out["properties"]["type"]["additionalProperties"] is False
    assert out["properties"]["$ref"] == {"type": ["string", "null"], "nullable": True}
    assert out["$defs"]["Free"]["additionalProperties"] is True
    assert all("additionalProperties" not in s for s in out["anyOf"][0]["allOf"])


def test_cut_call_parsing() -> None:
    """In-process: the pieces of a cut forced call (name prefix, partial arguments, Anthropic's input)."""
    from gerdsen_ai_server.serving.tools import ToolPlan, forced_calls, partial_arguments

    plan = ToolPlan("forced", names=["magic_other", "magic_function"])
    calls, complete = forced_calls(plan, '{"name": "magic_f')
    assert not complete and (calls[0].function.name, calls[0].function.arguments) == ("magic_function", "")
    calls, complete = forced_calls(plan, '{"name": "magic_function", "arguments": {"input": 3')
    assert (calls[0].function.name, calls[0].function.arguments) == ("magic_function", '{"input": 3')
    assert forced_calls(plan, '{"name": "magic_other", "arguments": {}}')[1] is True
    assert partial_arguments('{"a": 1, "b": "hel') == {"a": 1, "b": "hel"}
    assert partial_arguments('{"a": 1, "b": tr') == {"a": 1}
    assert partial_arguments("") == partial_arguments("[1,") == {}
