"""/v1/responses through the openai SDK's Responses client, against the real server."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support import DEFAULT_MODEL

pytestmark = pytest.mark.server

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_text_response(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.responses.create(
        model=DEFAULT_MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=30
    )
    assert reply.status == "completed" and reply.id.startswith("resp_")
    assert reply.output_text == "The capital of France is Paris."
    assert reply.usage.input_tokens > 10 and reply.usage.output_tokens == 8


def test_instructions_items_and_incomplete(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.responses.create(
        model=DEFAULT_MODEL,
        instructions="Answer briefly.",
        temperature=0,
        max_output_tokens=3,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}],
    )
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3


def test_stream_events(client) -> None:  # type: ignore[no-untyped-def]
    events = list(
        client.responses.create(
            model=DEFAULT_MODEL,
            input="What is the capital of France?",
            temperature=0,
            max_output_tokens=30,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert (
        "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The capital of France is Paris."
    )
    assert events[-1].response.output_text == "The capital of France is Paris."
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_round_trip(client, stream: bool) -> None:  # type: ignore[no-untyped-def]
    args = dict(
        model=DEFAULT_MODEL,
        input="Weather in Paris?",
        tools=[WEATHER],
        temperature=0,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
    )
    if stream:
        events = list(client.responses.create(**args, stream=True))
        reply = events[-1].response
    else:
        reply = client.responses.create(**args)
    call = [o for o in reply.output if o.type == "function_call"][0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(
        model=DEFAULT_MODEL,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_output_tokens=20,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"},
        ],
    )
    assert follow.output_text


def test_json_schema_text_format(client) -> None:  # type: ignore[no-untyped-def]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.responses.create(
        model=DEFAULT_MODEL,
        input="Name a capital city.",
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
    )
    assert set(json.loads(reply.output_text)) == {"city", "country"}


def test_unknown_previous_response_id_is_404(client) -> None:  # type: ignore[no-untyped-def]
    """Never stored (store: true), deleted or dropped: 404, never another conversation (the store's own
    tests: tests/api/test_response_store.py)."""
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=DEFAULT_MODEL, input="hi", previous_response_id="resp_123")
    assert info.value.body["param"] == "previous_response_id" and info.value.body["code"] == "response_not_found"
