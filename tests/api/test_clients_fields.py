"""Fields the official SDKs send (issue 24, item 1): docs/clients.md's table "Fields the SDKs send",
walked row by row against the real server, and the honoured fields shown to change the answer.

Raw requests for the table (its examples are the JSON on the wire); the ``openai`` SDK for the
targeted tests, as a client would send them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL

pytestmark = pytest.mark.server

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
SECTION = "## Fields the SDKs send"
PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}
# The smallest request each endpoint answers; a row's example is merged into it.
BASE: dict[str, dict[str, Any]] = {
    "chat": {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "completions": {"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2},
    "embeddings": {"model": DEFAULT_MODEL, "input": "Hi"},
    "responses": {"model": DEFAULT_MODEL, "input": "Hi", "max_output_tokens": 2},
}


@dataclass
class Row:
    field: str  # the first name in backticks: what a 400 must name
    endpoints: list[str]
    example: dict[str, Any]
    outcome: str  # honoured, accepted or 400

    def __str__(self) -> str:
        return f"{self.field}={json.dumps(self.example)}"


def table_rows() -> list[Row]:
    """The section's table rows, parsed: a malformed row fails the walk instead of being skipped."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith(("| field", "|---")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, f"a row needs 4 cells: {line}"
        field = re.search(r"`([^`]+)`", cells[0])
        outcome = re.match(r"\*\*(honoured|accepted|400)\*\*", cells[3])
        assert field and outcome, f"a row needs a `field` and a **honoured/accepted/400** outcome: {line}"
        endpoints = [e.strip() for e in cells[1].split(",")]
        assert set(endpoints) <= set(PATHS), f"unknown endpoint in: {line}"
        rows.append(Row(field.group(1), endpoints, json.loads(cells[2].strip("`")), outcome.group(1)))
    return rows


ROWS = table_rows()
CASES = [(row, endpoint) for row in ROWS for endpoint in row.endpoints]


def test_the_table_covers_what_the_sdks_send_by_default() -> None:
    """The fields the issue names, and the Agents SDK's default ``include``, each have a row."""
    fields = {row.field for row in ROWS}
    for name in (
        "include",
        "store",
        "metadata",
        "parallel_tool_calls",
        "user",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "truncation",
        "text.verbosity",
        "stream_options.include_obfuscation",
        "prompt_cache_retention",
        "reasoning",
        "top_logprobs",
        "modalities",
    ):
        assert name in fields, name
    assert any(row.example == {"include": []} and row.outcome == "accepted" for row in ROWS)


@pytest.mark.parametrize(("row", "endpoint"), CASES, ids=[f"{endpoint}:{row}" for row, endpoint in CASES])
def test_table_row(server, row: Row, endpoint: str) -> None:  # type: ignore[no-untyped-def]
    body = {**BASE[endpoint], **row.example}
    reply = requests.post(server.base_url + PATHS[endpoint], json=body, timeout=120, stream=True)
    text = reply.text
    if row.outcome == "400":
        assert reply.status_code == 400, text
        error = reply.json()["error"]
        assert error["param"] == row.field, error
        assert error["code"] in ("unsupported_parameter", "unknown_parameter"), error
        return
    assert reply.status_code == 200, text
    if body.get("stream"):
        assert "event: error" not in text and 'data: {"error"' not in text, text
        assert "data: [DONE]" in text or "response.completed" in text or "response.incomplete" in text, text
    else:
        assert "error" not in reply.json() or reply.json()["error"] is None, text


def test_unknown_fields_are_still_refused(server) -> None:  # type: ignore[no-untyped-def]
    """Accepting the SDKs' fields did not open the schemas: a typo of one is still named."""
    for endpoint, field in (("chat", "parallel_tool_call"), ("responses", "includes"), ("responses", "stor")):
        reply = requests.post(server.base_url + PATHS[endpoint], json={**BASE[endpoint], field: True}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["message"] == (
            f"Unrecognized request argument supplied: {field}"
        ), reply.text
    reply = requests.post(
        server.base_url + "/responses", json={**BASE["responses"], "include": ["everything"]}, timeout=60
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("include"), reply.text
    reply = requests.post(
        server.base_url + "/responses",
        json={**BASE["responses"], "metadata": {f"k{i}": "v" for i in range(17)}},
        timeout=60,
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "metadata", reply.text


# ---- honoured fields change the answer ------------------------------------------------------


def test_agents_sdk_default_include_is_accepted(client) -> None:  # type: ignore[no-untyped-def]
    """The OpenAI Agents SDK's Responses call: ``include=[]`` on every request (a 400 before)."""
    response = client.responses.create(
        model=DEFAULT_MODEL, input="Say hi", include=[], max_output_tokens=4, temperature=0
    )
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.output[0].content[0].logprobs == []  # asked for none


@pytest.mark.parametrize("stream", [False, True])
def test_include_logprobs_returns_them(client, stream: bool) -> None:  # type: ignore[no-untyped-def]
    args = dict(
        model=DEFAULT_MODEL,
        input="Say hi",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=4,
        temperature=0,
    )
    if stream:
        events = list(client.responses.create(**args, stream=True))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert deltas and all(e.logprobs for e in deltas)
        response = next(e.response for e in events if e.type in ("response.completed", "response.incomplete"))
    else:
        response = client.responses.create(**args)
    part = response.output[0].content[0]
    assert part.logprobs, part
    assert "".join(lp.token for lp in part.logprobs).strip() == part.text.strip()
    for lp in part.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob
        assert lp.logprob <= lp.top_logprobs[0].logprob + 1e-4  # the best alternative is at least as likely
        assert bytes(lp.bytes).decode() == lp.token


def test_top_logprobs_alone_returns_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    response = client.responses.create(
        model=DEFAULT_MODEL, input="Say hi", top_logprobs=0, max_output_tokens=3, temperature=0
    )
    part = response.output[0].content[0]
    assert part.logprobs and all(lp.top_logprobs == [] for lp in part.logprobs)


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
# A history in which the assistant called the tool twice at once: at temperature 0 the model does it
# again, so the answer has two calls unless parallel_tool_calls is false.
TWO_CALLS = [
    {"role": "user", "content": "Weather in Paris and London?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "London"}'},
            },
        ],
    },
    {"role": "user", "content": "Again: weather in Paris and London?"},
]


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_means_one_call(client, stream: bool) -> None:  # type: ignore[no-untyped-def]
    def calls(parallel: bool | None) -> list[str]:
        args: dict[str, Any] = dict(
            model=DEFAULT_MODEL, messages=TWO_CALLS, tools=[WEATHER], temperature=0, max_tokens=64
        )
        if parallel is not None:
            args["parallel_tool_calls"] = parallel
        if stream:
            chunks = list(client.chat.completions.create(**args, stream=True))
            found = [
                tc.function.arguments
                for c in chunks
                if c.choices and c.choices[0].delta.tool_calls
                for tc in c.choices[0].delta.tool_calls
            ]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
            assert "tool_call" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return found
        reply = client.chat.completions.create(**args)
        assert reply.choices[0].finish_reason == "tool_calls"
        assert "tool_call" not in (reply.choices[0].message.content or "")  # a dropped call is not shown as text
        return [tc.function.arguments for tc in reply.choices[0].message.tool_calls or []]

    both = calls(None)
    assert len(both) == 2, both  # the premise: this conversation draws two calls
    assert calls(False) == both[:1]


def test_parallel_tool_calls_false_on_responses(client) -> None:  # type: ignore[no-untyped-def]
    tool = {"type": "function", **WEATHER["function"]}
    items = [
        TWO_CALLS[0],
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "London"}'},
        TWO_CALLS[2],
    ]
    args = dict(model=DEFAULT_MODEL, input=items, tools=[tool], temperature=0, max_output_tokens=64)
    both = [i for i in client.responses.create(**args).output if i.type == "function_call"]
    one = [i for i in client.responses.create(**args, parallel_tool_calls=False).output if i.type == "function_call"]
    assert len(both) == 2 and len(one) == 1 and one[0].arguments == both[0].arguments


def test_refusals_say_why(client) -> None:  # type: ignore[no-untyped-def]
    """A refused field is named, with the reason, in the SDK's BadRequestError."""
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=DEFAULT_MODEL, input="hi", reasoning={"effort": "high"})
    assert info.value.body["param"] == "reasoning.effort" and "reasoning" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "wav"},
        )
    assert info.value.body["param"] in ("audio", "modalities") and "audio" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=DEFAULT_MODEL, input="hi", stream_options={"include_obfuscation": False})
    assert info.value.body["param"] == "stream_options"
