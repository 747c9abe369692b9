"""Anthropic inputs through the official `anthropic` SDK, against the real server (issue 24 item 3):
every content block a text model can take, the fields the SDK and Claude-Code-style agents send,
and a 400 naming each block (or OpenAI content part) a text model cannot take."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server

GREEDY = {"temperature": 0}
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
EPHEMERAL = {"type": "ephemeral"}
COLOR_PICKER = {
    "name": "color_picker",
    "description": "Input your fav color and get a random fact about it.",
    "input_schema": {"type": "object", "properties": {"fav_color": {"type": "string"}}, "required": ["fav_color"]},
    "cache_control": EPHEMERAL,
}


@pytest.fixture(scope="module")
def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)


def conversation(result: Any, is_error: bool = False) -> list[dict[str, Any]]:
    """langchain-tests' `test_anthropic_inputs`, as ChatAnthropic sends it."""
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what's your favorite color", "cache_control": EPHEMERAL}],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Hmm let me think about that"},
                {
                    "type": "tool_use",
                    "id": "foo",
                    "name": "color_picker",
                    "input": {"fav_color": "green"},
                    "cache_control": EPHEMERAL,
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "foo",
                    "content": result,
                    "is_error": is_error,
                    "cache_control": EPHEMERAL,
                }
            ],
        },
    ]


def count(claude: anthropic.Anthropic, messages: list[dict[str, Any]], **extra: Any) -> int:
    return claude.messages.count_tokens(model=DEFAULT_MODEL, messages=messages, **extra).input_tokens  # type: ignore[arg-type]


def test_langchain_style_conversation(claude: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "you're a good assistant", "cache_control": EPHEMERAL}]
    reply = claude.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=10,
        extra_body=GREEDY,
        system=system,
        tools=[COLOR_PICKER],
        messages=conversation("That's a great pick!"),
    )
    assert reply.type == "message" and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The tool result reaches the prompt the same way as a string or as text blocks; is_error marks it.
    as_string = count(claude, conversation("That's a great pick!"), system=system, tools=[COLOR_PICKER])
    as_blocks = count(
        claude,
        conversation(
            [{"type": "text", "text": "That's a great ", "cache_control": EPHEMERAL}, {"type": "text", "text": "pick!"}]
        ),
        system=system,
        tools=[COLOR_PICKER],
    )
    as_error = count(claude, conversation("That's a great pick!", is_error=True), system=system, tools=[COLOR_PICKER])
    assert as_string == as_blocks == reply.usage.input_tokens
    assert as_error > as_string


def test_system_turns_in_messages(claude: anthropic.Anthropic) -> None:
    """The current SDK's MessageParam allows a system turn; it is the system prompt there."""
    turns = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]}, *CAPITAL]
    assert count(claude, turns) == count(claude, CAPITAL, system="You are terse.")


def test_thinking_blocks_replayed_and_dropped(claude: anthropic.Anthropic) -> None:
    """A history from a thinking-enabled model: its thinking blocks are accepted and left out of the
    prompt, as Anthropic leaves earlier turns' thinking out."""

    def history(thinking: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "assistant", "content": [*thinking, {"type": "text", "text": "Hello, how are you?"}]},
            {"role": "user", "content": [{"type": "text", "text": "Well, thanks."}]},
        ]

    replayed = history(
        [
            {"type": "thinking", "thinking": "I'm thinking...", "signature": "abc123"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"},
        ]
    )
    reply = claude.messages.create(model=DEFAULT_MODEL, max_tokens=5, extra_body=GREEDY, messages=replayed)
    assert reply.type == "message" and reply.usage.input_tokens == count(claude, history([]))
    assert count(claude, replayed) == count(claude, history([]))


@pytest.mark.parametrize(
    "fields",
    [
        {"metadata": {"user_id": "user-7f3a"}},
        {"service_tier": "standard_only"},
        {"service_tier": "auto", "extra_body": {**GREEDY, "speed": "standard", "inference_geo": "eu"}},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
        {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}},
        {"thinking": {"type": "disabled"}},
        {"extra_body": {**GREEDY, "cache_control": EPHEMERAL}},
        {
            "extra_body": {
                **GREEDY,
                "context_management": {
                    "edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]
                },
            }
        },
        {"tools": [COLOR_PICKER], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
        {"tools": [{**COLOR_PICKER, "strict": True, "eager_input_streaming": True}], "tool_choice": {"type": "none"}},
    ],
    ids=lambda fields: (
        "+".join(k for k in fields if k not in ("max_tokens", "extra_body"))
        + "+".join(k for k in fields.get("extra_body", {}) if k != "temperature")
    ),
)
def test_fields_that_cannot_change_the_answer(claude: anthropic.Anthropic, fields: dict[str, Any]) -> None:
    """Accepted, and the greedy answer is the one the plain request gets."""
    args: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "max_tokens": 30,
        "messages": CAPITAL,
        "extra_body": GREEDY,
        **fields,
    }
    reply = claude.messages.create(**args)
    assert reply.content[0].type == "text" and reply.content[0].text == ANSWER
    assert not any(block.type == "thinking" for block in reply.content)


def test_sampling_fields_are_honoured(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=30,
        messages=CAPITAL,
        stop_sequences=["Paris"],
        extra_body={"temperature": 1.0, "top_k": 1},
    )  # top_k 1 is greedy at any temperature
    assert reply.content[0].text == "The capital of France is " and reply.stop_sequence == "Paris"


def test_output_config_format_is_honoured(claude: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reply = claude.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=40,
        messages=CAPITAL,
        extra_body=GREEDY,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert list(json.loads(reply.content[0].text)) == ["city"]


@pytest.mark.parametrize(
    ("messages", "where", "what"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                        },
                    ],
                }
            ],
            "messages.0.content.1",
            f"the model '{DEFAULT_MODEL}' is a text model and cannot take images",  # serving/images.py
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "The grass is green."},
                        }
                    ],
                }
            ],
            "messages.0.content.0",
            "document blocks are not supported by this server",
        ),
        (
            conversation(
                [
                    {"type": "text", "text": "see:"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                ]
            ),
            "messages.2.content.0.content.1",
            "image blocks are not supported here",  # in a tool result
        ),
        (
            [
                CAPITAL[0],
                {
                    "role": "assistant",
                    "content": [
                        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}}
                    ],
                },
            ],
            "messages.1.content.0",
            "blocks of type 'server_tool_use' are not supported by this server",
        ),
    ],
)
@pytest.mark.parametrize("route", ["create", "count_tokens"])
def test_blocks_a_text_model_cannot_take_are_named(
    claude: anthropic.Anthropic, route: str, messages: list[dict[str, Any]], where: str, what: str
) -> None:
    call = claude.messages.create if route == "create" else claude.messages.count_tokens
    kwargs: dict[str, Any] = {"max_tokens": 5} if route == "create" else {}
    with pytest.raises(anthropic.BadRequestError) as info:
        call(model=DEFAULT_MODEL, messages=messages, **kwargs)
    message = info.value.body["error"]["message"]
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert message.startswith(f"{where}: {what}") and ".str" not in message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"mcp_servers": [{"type": "url", "url": "https://example.com/mcp", "name": "x"}]}, "mcp_servers"),
        ({"container": "container_011"}, "container"),
        ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "clear_tool_uses_20250919"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "budget_tokens"),  # not below max_tokens
    ],
)
def test_fields_that_would_mislead_are_refused(claude: anthropic.Anthropic, fields: dict[str, Any], named: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=DEFAULT_MODEL, max_tokens=30, messages=CAPITAL, extra_body=fields)
    assert named in info.value.body["error"]["message"]


def test_a_bad_block_is_located_without_union_labels(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model=DEFAULT_MODEL, max_tokens=5, messages=[{"role": "user", "content": [{"type": "text", "txt": "typo"}]}]
        )
    assert "'messages.0.content.0.text'" in info.value.body["error"]["message"]


def test_openai_image_part_is_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                }
            ],
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert (
        error["message"]
        == f"messages.0.content.1: the model '{DEFAULT_MODEL}' is a text model and cannot take images; use a vision model"
        and error["param"] == "messages.0.content.1"
        and error["code"] == "model_not_supported"
    )
