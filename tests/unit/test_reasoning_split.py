"""serving/reasoning.py's splitter: reasoning and answer apart whatever the chunking, markers split
across chunks held back (never leaked into either side), whitespace trimmed, and the plan read from
the rendered prompt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest
from gerdsen_ai_server.serving.reasoning import (
    ReasoningSplitter,
    reasoning_plan,
    split_reasoning,
    template_kwargs,
)

THINKER = SimpleNamespace(think_start="<think>", think_end="</think>", chat_template="{{ enable_thinking }}")
PLAIN = SimpleNamespace(chat_template="{{ messages }}")


def run(text: str, sizes: int, inside: bool) -> tuple[str, str, list[tuple[str, str]]]:
    """``text`` fed ``sizes`` characters at a time; the pieces each feed returned."""
    splitter = ReasoningSplitter("<think>", "</think>", inside)
    pieces = [text[i : i + sizes] for i in range(0, len(text), sizes)] or [""]
    out = [splitter.feed(p, final=n == len(pieces) - 1) for n, p in enumerate(pieces)]
    return "".join(r for r, _ in out), "".join(c for _, c in out), out


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_every_chunking_splits_the_same(size: int) -> None:
    reasoning, content, pieces = run("Let me think.\n</think>\n\nThe answer.", size, inside=True)
    assert (reasoning, content) == ("Let me think.", "The answer.")
    for thought, answer in pieces:  # no piece of a marker ever comes out
        assert "<" not in thought and "/" not in answer and ">" not in answer
    reasoning, content, _ = run("\n<think>\nHmm </think> Yes", size, inside=False)
    assert (reasoning, content) == ("Hmm", "Yes")


def test_partial_marker_held_then_released() -> None:
    splitter = ReasoningSplitter("<think>", "</think>", inside=True)
    assert splitter.feed("a </th") == ("a", "")  # "</th" may be the end marker; the space may end the reasoning
    assert splitter.feed("ing> b") == (" </thing> b", "")  # it was not
    assert splitter.feed("</think>c", final=True) == ("", "c")


def test_no_markers_is_all_content() -> None:
    assert run("Plain answer <b>", 2, inside=False)[:2] == ("", "Plain answer <b>")
    # A start marker after the answer began is text, not reasoning (one block, at the start only).
    assert run("Hi <think>x</think>", 3, inside=False)[:2] == ("", "Hi <think>x</think>")
    assert run("  ", 1, inside=False)[:2] == ("", "  ")  # held whitespace comes back at the end


def test_cut_inside_thinking() -> None:
    assert run("Let me thi", 4, inside=True)[:2] == ("Let me thi", "")
    assert run("Let me </thi", 4, inside=True)[:2] == ("Let me </thi", "")


def test_plan_from_the_prompt() -> None:
    plan = reasoning_plan(THINKER, "<|im_start|>assistant\n<think>\n")
    assert plan is not None and plan.inside
    off = reasoning_plan(THINKER, "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off is not None and not off.inside
    assert split_reasoning(off, "The answer") == (None, "The answer")
    assert split_reasoning(plan, "Hmm</think>Yes") == ("Hmm", "Yes")
    assert reasoning_plan(PLAIN, "<think>\n") is None
    assert split_reasoning(None, "<think>x</think>y") == (None, "<think>x</think>y")  # no markers: untouched


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_template_kwargs() -> None:
    assert template_kwargs(request(), THINKER) == {}
    assert template_kwargs(request(chat_template_kwargs={"enable_thinking": False, "x": [1]}), PLAIN) == {
        "enable_thinking": False,
        "x": [1],
    }
    assert template_kwargs(request(reasoning_effort="none"), THINKER) == {
        "reasoning_effort": "none",
        "enable_thinking": False,
    }
    assert template_kwargs(request(reasoning_effort="high"), THINKER) == {"reasoning_effort": "high"}
    explicit = request(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True})
    assert template_kwargs(explicit, THINKER)["enable_thinking"] is True  # the request's own kwarg wins
    gpt_oss = SimpleNamespace(chat_template="{{ reasoning_effort }}")
    assert template_kwargs(request(reasoning_effort="low"), gpt_oss) == {"reasoning_effort": "low"}
    with pytest.raises(APIError) as caught:
        template_kwargs(request(reasoning_effort="low"), PLAIN)
    assert caught.value.param == "reasoning_effort"


def test_tool_calls_only_from_the_answer() -> None:
    """A tool-call marker inside the thinking is thinking (a model musing about a call); the call in
    the answer is parsed."""
    from gerdsen_ai_server.engine.protocol import TokenEvent
    from gerdsen_ai_server.serving.tools import ToolPlan, answer_parts

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    text = 'Maybe <tool_call>{"name": "f", "arguments": {}}</tool_call>?</think>Calling. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    events = [TokenEvent(text=text[i : i + 4]) for i in range(0, len(text), 4)]
    events[-1].finish_reason = "stop"
    parts = list(answer_parts(ToolPlan("auto", [tool]), events, ReasoningSplitter("<think>", "</think>", True)))
    thought = "".join(v for k, v in parts if k == "reasoning")
    assert thought == 'Maybe <tool_call>{"name": "f", "arguments": {}}</tool_call>?'
    assert "".join(v for k, v in parts if k == "text") == "Calling. "
    calls, last = parts[-1][1]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"a": 1}')]
    assert last.finish_reason == "tool_calls"


HARMONY = SimpleNamespace(chat_template="{{ '<|start|>assistant<|channel|>final<|message|>' }}{{ reasoning_effort }}")
HARMONY_REPLY = (
    "<|channel|>analysis<|message|>User asks colour. Blue.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>The sky is blue."
)


@pytest.mark.parametrize("size", [1, 3, 8, 200])
def test_harmony_channels(size: int) -> None:
    """gpt-oss: the analysis channel is the reasoning, the final channel's header is dropped."""
    plan = reasoning_plan(HARMONY, "<|start|>user<|message|>Hi<|end|><|start|>assistant")
    assert plan is not None and not plan.inside
    splitter = plan.splitter()
    text = HARMONY_REPLY
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    out = [splitter.feed(p, final=n == len(pieces) - 1) for n, p in enumerate(pieces)]
    assert ("".join(r for r, _ in out), "".join(c for _, c in out)) == ("User asks colour. Blue.", "The sky is blue.")
    assert split_reasoning(plan, "<|channel|>final<|message|>Straight to it.") == (None, "Straight to it.")
    assert split_reasoning(plan, "Plain text") == (None, "Plain text")
