"""/v1/messages through Anthropic's official SDK, against the real server."""

from __future__ import annotations

import json

import anthropic
import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server

GREEDY = {"temperature": 0}  # the current SDK no longer names temperature; older clients send it
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)


def test_message(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model=DEFAULT_MODEL, max_tokens=30, extra_body=GREEDY, messages=CAPITAL)
    assert reply.type == "message" and reply.id.startswith("msg_")
    assert reply.content[0].type == "text" and reply.content[0].text == "The capital of France is Paris."
    assert reply.stop_reason == "end_turn"
    assert reply.usage.input_tokens > 10 and reply.usage.output_tokens == 8  # seven words' tokens and the end of turn


def test_system_blocks_stop_sequences_and_max_tokens(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=30,
        extra_body=GREEDY,
        messages=CAPITAL,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        stop_sequences=["France"],
    )
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "France"
    assert "France" not in reply.content[0].text
    short = claude.messages.create(model=DEFAULT_MODEL, max_tokens=2, extra_body=GREEDY, messages=CAPITAL)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_stream_event_sequence(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=DEFAULT_MODEL, max_tokens=30, extra_body=GREEDY, messages=CAPITAL) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.content[0].text == "The capital of France is Paris." and final.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_use_and_result(claude: anthropic.Anthropic, stream: bool) -> None:
    args = dict(
        model=DEFAULT_MODEL,
        max_tokens=60,
        extra_body=GREEDY,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    if stream:
        with claude.messages.stream(**args) as s:
            reply = s.get_final_message()
    else:
        reply = claude.messages.create(**args)
    assert reply.stop_reason == "tool_use"
    use = [b for b in reply.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and isinstance(use.input["city"], str) and use.id.startswith("toolu_")
    follow = claude.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=20,
        extra_body=GREEDY,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, sunny"}]},
        ],
        tool_choice={"type": "none"},
    )
    assert follow.content[0].type == "text" and follow.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=DEFAULT_MODEL, messages=CAPITAL)
    reply = claude.messages.create(model=DEFAULT_MODEL, max_tokens=1, messages=CAPITAL)
    assert counted.input_tokens == reply.usage.input_tokens


def test_errors_use_anthropic_shape(claude: anthropic.Anthropic, server: Server) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="claude-9", max_tokens=5, messages=CAPITAL)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"
    r = requests.post(f"{server.url}/v1/messages", json={"model": DEFAULT_MODEL, "messages": CAPITAL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = requests.post(f"{server.url}/v1/messages", data="{", timeout=30, headers={"content-type": "application/json"})
    assert r.status_code == 400 and json.loads(r.text)["type"] == "error"


def test_x_api_key_auth(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.server import start_server, stop_server

    srv = start_server(tmp_path, IMPETUS_API_KEYS="sk-impetus-test-0123456789")
    try:
        good = anthropic.Anthropic(base_url=srv.url, api_key="sk-impetus-test-0123456789", max_retries=0, timeout=120)
        reply = good.messages.create(model=DEFAULT_MODEL, max_tokens=3, extra_body=GREEDY, messages=CAPITAL)
        assert reply.usage.output_tokens == 3
        bad = anthropic.Anthropic(base_url=srv.url, api_key="sk-wrong", max_retries=0, timeout=120)
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model=DEFAULT_MODEL, max_tokens=3, messages=CAPITAL)
        assert info.value.status_code == 401
    finally:
        stop_server(srv, wait=False)


def test_size_and_method_errors_use_anthropic_shape(claude: anthropic.Anthropic, server: Server) -> None:
    """Werkzeug's own 413 and 405 come in Anthropic's shape on /v1/messages, not OpenAI's envelope."""
    huge = {"model": DEFAULT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 10_000_000}]}
    with pytest.raises(anthropic.APIStatusError) as info:
        claude.messages.create(**huge)
    assert info.value.status_code == 413
    assert (
        info.value.body
        == {"type": "error", "error": {"type": "request_too_large", "message": info.value.body["error"]["message"]}}
        and info.value.body["error"]["message"]
    )
    r = requests.get(f"{server.url}/v1/messages", timeout=30)
    assert r.status_code == 405 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(f"{server.url}/v1/chat/completions", json=huge, timeout=30)  # the OpenAI routes keep theirs
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
