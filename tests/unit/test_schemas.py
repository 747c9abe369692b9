"""Wire-format validation and stop-string matching, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gerdsen_ai_server.engine.text import StopMatcher
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, CompletionRequest
from gerdsen_ai_server.web.errors import validation_error

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_request_defaults_and_text_parts() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        }
    )
    assert req.messages[0].text() == "ab"
    assert req.temperature == 1.0 and req.stream is False and req.stop_list() == []
    assert req.unsupported() is None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": MESSAGES}, "model", "missing_required_parameter"),
        ({"model": "m", "messages": MESSAGES, "temperature": -1}, "temperature", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "stop": ""}, "stop", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "bogus": 1}, "bogus", "unknown_parameter"),
        ({"model": "m", "messages": []}, "messages", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
    ],
)
def test_errors_name_the_param(body: dict, param: str, code: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(info.value)
    assert (error.status, error.param, error.code) == (400, param, code)


def test_known_but_unsupported_options_are_reported() -> None:
    assert ChatCompletionRequest(model="m", messages=MESSAGES, functions=[{}]).unsupported() == "functions"  # type: ignore[arg-type]
    assert ChatCompletionRequest(model="m", messages=MESSAGES, logprobs=True, top_logprobs=2).logprob_count() == 2  # type: ignore[arg-type]
    assert ChatCompletionRequest(model="m", messages=MESSAGES).logprob_count() is None  # type: ignore[arg-type]
    assert ChatCompletionRequest(
        model="m", messages=MESSAGES, response_format={"type": "json_object"}
    ).json_schema() == {"type": "object"}  # type: ignore[arg-type]
    assert ChatCompletionRequest(model="m", messages=MESSAGES, response_format={"type": "text"}).json_schema() is None  # type: ignore[arg-type]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer"}}}
    assert ChatCompletionRequest(model="m", messages=MESSAGES, response_format=fmt).json_schema() == {"type": "integer"}  # type: ignore[arg-type]
    assert CompletionRequest(model="m", prompt="x", echo=True).unsupported() == "echo"


def test_prompt_shapes() -> None:
    for prompt in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert CompletionRequest(model="m", prompt=prompt).prompt == prompt


def stream_through(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = ""
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            return out, hit
    return out + matcher.flush(), None


def test_stop_matcher_across_pieces() -> None:
    assert stream_through(StopMatcher(["END"]), ["abc E", "N", "D tail"]) == ("abc ", "END")
    assert stream_through(StopMatcher(["END"]), ["abc E", "N", "x"]) == ("abc ENx", None)
    assert stream_through(StopMatcher(["xy", "abcd"]), ["ab", "cxy"]) == ("abc", "xy")
    assert stream_through(StopMatcher([]), ["a", "b"]) == ("ab", None)


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("hello <") == ("hello ", None)
    assert matcher.feed("b>") == ("<b>", None)
