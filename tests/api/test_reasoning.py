"""Issue 26 items 1 and 2 (request side) through the real server and the real SDKs: a thinking model's
reasoning kept apart from its answer on every chat-shaped API, and the template controls
(``chat_template_kwargs``, ``add_generation_prompt``, ``continue_final_message``, ``reasoning_effort``).

The model (tests/support/thinking_model.py) greedy-decodes a fixed script: its prompt ends with
``<think>\\n``, it writes "Let me think about it", ``</think>``, then "The answer is blue!"; with
``enable_thinking: false`` its template closes the think block and it writes the answer alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.thinking_model import ANSWER, REASONING, build_thinking_llama

pytestmark = pytest.mark.server

THINKER = "thinker"
ASK = [{"role": "user", "content": "What colour is the sky?"}]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_thinking_llama(tmp_path_factory.mktemp("reasoning-models") / THINKER, default_model_folder())


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, thinker: Path) -> Iterator[Server]:
    models = thinker.parent
    server = start_server(
        tmp_path_factory.mktemp("reasoning-server"),
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_DEFAULT_MODEL=str(TEST_MODELS_DIR / DEFAULT_MODEL),
        IMPETUS_BACKEND="mlx",
    )
    yield server
    stop_server(server, wait=False)


@pytest.fixture(scope="module")
def oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(srv: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key="not-needed", max_retries=0, timeout=120)


def reasoning_of(message: Any) -> str | None:
    """``reasoning_content`` as the SDK exposes a field it does not declare (model_extra)."""
    return (message.model_extra or {}).get("reasoning_content")


def test_chat_reasoning_apart(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert reasoning_of(choice.message) == REASONING
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"


def test_chat_stream_reasoning_deltas(oai: openai.OpenAI) -> None:
    thought, answer, finish = [], [], None
    stream = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, stream=True)  # type: ignore[arg-type]
    for chunk in stream:
        for choice in chunk.choices:
            if r := reasoning_of(choice.delta):
                assert not choice.delta.content  # never both in one delta
                thought.append(r)
            answer.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(thought) == REASONING
    assert "".join(answer) == ANSWER
    assert len(thought) > 1  # streamed as it came, not in one piece
    assert finish == "stop"


def test_n_choices_each_split(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, n=2)  # type: ignore[arg-type]
    assert [(reasoning_of(c.message), c.message.content) for c in reply.choices] == [(REASONING, ANSWER)] * 2
    thought: dict[int, str] = {0: "", 1: ""}
    for chunk in oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, n=2, stream=True):  # type: ignore[arg-type]
        for choice in chunk.choices:
            thought[choice.index] += reasoning_of(choice.delta) or ""
    assert thought == {0: REASONING, 1: REASONING}


def test_enable_thinking_false(oai: openai.OpenAI) -> None:
    on = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40)  # type: ignore[arg-type]
    off = oai.chat.completions.create(
        model=THINKER,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert off.choices[0].message.content == ANSWER
    assert reasoning_of(off.choices[0].message) is None
    assert "reasoning_content" not in off.choices[0].message.model_dump(exclude_unset=True)
    # The template rendered the closed think block: "\n\n</think>\n\n" is more prompt than "\n".
    assert on.usage is not None and off.usage is not None
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
    assert off.usage.completion_tokens < on.usage.completion_tokens


def test_constrained_output_switches_thinking_off(oai: openai.OpenAI) -> None:
    """A JSON-constrained reply cannot think: the template's switch is off, and nothing is split."""
    off = oai.chat.completions.create(
        model=THINKER,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    reply = oai.chat.completions.create(
        model=THINKER,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=12,
        response_format={"type": "json_object"},
    )
    assert reasoning_of(reply.choices[0].message) is None
    assert (reply.choices[0].message.content or "").startswith("{")
    assert reply.usage is not None and off.usage is not None
    assert reply.usage.prompt_tokens == off.usage.prompt_tokens


def test_reasoning_effort_none_switches_thinking_off(oai: openai.OpenAI) -> None:
    off = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, reasoning_effort="none")  # type: ignore[arg-type]
    assert (reasoning_of(off.choices[0].message), off.choices[0].message.content) == (None, ANSWER)
    low = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, reasoning_effort="low")  # type: ignore[arg-type]
    assert reasoning_of(low.choices[0].message) == REASONING


def test_reasoning_effort_refused_for_a_model_that_does_not_reason(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=4, reasoning_effort="low")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "reasoning_effort"  # type: ignore[index]


def test_model_without_markers_unchanged(srv: Server, oai: openai.OpenAI) -> None:
    """SmolLM2 has no thinking markers: no reasoning_content key at all, and template kwargs pass
    through harmlessly (its template reads none of them)."""
    plain = requests.post(
        f"{srv.base_url}/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0},
        timeout=120,
    ).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]
    with_kwargs = oai.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert with_kwargs.choices[0].message.content == plain["choices"][0]["message"]["content"]
    assert with_kwargs.usage is not None and with_kwargs.usage.prompt_tokens == plain["usage"]["prompt_tokens"]
    raw = requests.post(
        f"{srv.base_url}/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 4, "stream": True, "temperature": 0},
        timeout=120,
    ).text
    assert "reasoning_content" not in raw


def test_max_tokens_cut_inside_thinking(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=3)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert reasoning_of(choice.message) == "Let me think"
    assert choice.message.content == ""
    assert choice.finish_reason == "length"


def test_stop_string_inside_the_answer(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, stop=[" is"])  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert (reasoning_of(choice.message), choice.message.content) == (REASONING, "The answer")
    assert choice.finish_reason == "stop"
    # A stop string inside the thinking ends it there, as in vLLM: the reasoning so far, no answer.
    cut = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40, stop=[" about"])  # type: ignore[arg-type]
    assert (reasoning_of(cut.choices[0].message), cut.choices[0].message.content) == ("Let me think", "")
    assert cut.choices[0].finish_reason == "stop"


def test_add_generation_prompt_false_and_continue_final_message(srv: Server, oai: openai.OpenAI, thinker: Path) -> None:
    from transformers import AutoTokenizer

    generation_prompt = AutoTokenizer.from_pretrained(str(thinker)).encode("<|im_start|>assistant\n<think>\n")
    opened = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    closed = oai.chat.completions.create(
        model=THINKER,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=1,
        extra_body={"add_generation_prompt": False},
    )
    assert opened.usage is not None and closed.usage is not None
    assert opened.usage.prompt_tokens - closed.usage.prompt_tokens == len(generation_prompt)  # left out
    prefilled = [*ASK, {"role": "assistant", "content": "The answer"}]
    reply = oai.chat.completions.create(
        model=THINKER,
        messages=prefilled,  # type: ignore[arg-type]
        max_tokens=10,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert reply.choices[0].message.content == " is blue!"  # carried on from "The answer"
    for bad, param in (
        ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt true
        ({"continue_final_message": True, "add_generation_prompt": False, "messages": ASK}, "messages"),
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ):
        body = {"model": THINKER, "messages": prefilled, "max_tokens": 1, **bad}
        response = requests.post(f"{srv.base_url}/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == param, (bad, response.text)


def test_anthropic_thinking_blocks(claude: anthropic.Anthropic) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    reply = claude.messages.create(model=THINKER, max_tokens=2048, messages=ASK, thinking=thinking)  # type: ignore[arg-type]
    assert [block.type for block in reply.content] == ["thinking", "text"]
    block = reply.content[0]
    assert block.type == "thinking" and block.thinking == REASONING and len(block.signature) == 64
    assert reply.content[1].type == "text" and reply.content[1].text == ANSWER
    assert reply.stop_reason == "end_turn"
    omitted = {**thinking, "display": "omitted"}  # the block without its text, its signature kept
    hidden = claude.messages.create(model=THINKER, max_tokens=2048, messages=ASK, thinking=omitted)  # type: ignore[arg-type]
    assert [(b.type, getattr(b, "thinking", None)) for b in hidden.content] == [("thinking", ""), ("text", None)]
    assert hidden.content[0].signature == block.signature  # type: ignore[union-attr]
    # Thinking disabled (or not asked for): the template's switch is off, and no thinking block.
    for extra in ({"thinking": {"type": "disabled"}}, {}):
        plain = claude.messages.create(model=THINKER, max_tokens=64, messages=ASK, **extra)  # type: ignore[arg-type]
        assert [(b.type, getattr(b, "text", None)) for b in plain.content] == [("text", ANSWER)]
        assert plain.usage.output_tokens < reply.usage.output_tokens


def test_anthropic_thinking_stream(srv: Server, claude: anthropic.Anthropic) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with claude.messages.stream(model=THINKER, max_tokens=2048, messages=ASK, thinking=thinking) as stream:  # type: ignore[arg-type]
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == REASONING and final.content[1].text == ANSWER  # type: ignore[union-attr]
    deltas = [d for kind, d in kinds if kind == "content_block_delta"]
    assert deltas.count("signature_delta") == 1
    first_text = deltas.index("text_delta")
    assert set(deltas[: first_text - 1]) == {"thinking_delta"} and deltas[first_text - 1] == "signature_delta"
    # The raw events: the thinking block starts with empty thinking and signature, as Anthropic's do.
    raw = requests.post(
        f"{srv.url}/v1/messages",
        json={"model": THINKER, "max_tokens": 2048, "messages": ASK, "thinking": thinking, "stream": True},
        timeout=120,
    ).text
    starts = [json.loads(line[6:]) for line in raw.splitlines() if '"content_block_start"' in line]
    assert starts[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[1]["content_block"]["type"] == "text"
    plain = requests.post(
        f"{srv.url}/v1/messages",
        json={"model": THINKER, "max_tokens": 64, "messages": ASK, "stream": True},
        timeout=120,
    ).text
    assert "thinking" not in plain and "Let me" not in plain


def test_responses_reasoning_item(oai: openai.OpenAI, thinker: Path) -> None:
    from transformers import AutoTokenizer

    reply = oai.responses.create(model=THINKER, input=ASK[0]["content"], max_output_tokens=40)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    item = reply.output[0]
    assert item.type == "reasoning" and item.content is not None and item.summary == []
    assert [(c.type, c.text) for c in item.content] == [("reasoning_text", REASONING)]
    assert reply.output_text == ANSWER
    assert reply.usage is not None
    thought_tokens = len(AutoTokenizer.from_pretrained(str(thinker)).encode(REASONING))
    assert reply.usage.output_tokens_details.reasoning_tokens == thought_tokens
    # The reasoning item passed back as OpenAI asks clients to: accepted, and left out of the prompt.
    again = oai.responses.create(
        model=THINKER,
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            item.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "And the sea?"},
        ],
        max_output_tokens=40,
    )
    assert again.output_text == ANSWER
    # effort "none": the template's thinking switch off, no reasoning item; a model that does not reason: a 400.
    off = oai.responses.create(model=THINKER, input="Hi", max_output_tokens=40, reasoning={"effort": "none"})
    assert [i.type for i in off.output] == ["message"] and off.usage is not None
    assert off.usage.output_tokens_details.reasoning_tokens == 0
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=DEFAULT_MODEL, input="Hi", max_output_tokens=4, reasoning={"effort": "low"})


def test_responses_cut_inside_reasoning(oai: openai.OpenAI) -> None:
    reply = oai.responses.create(model=THINKER, input="Hi", max_output_tokens=3)
    assert reply.status == "incomplete"
    assert [(i.type, i.status) for i in reply.output] == [("reasoning", "incomplete")]
    assert reply.output_text == ""


def test_responses_stream_reasoning_events(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=THINKER, input="Hi", max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == REASONING and len(deltas) > 1
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == REASONING and done.output_index == 0
    # The reasoning item is done before the message's first text.
    assert kinds.index("response.output_item.done") < kinds.index("response.output_text.delta")
    text_delta = next(e for e in events if e.type == "response.output_text.delta")
    assert text_delta.output_index == 1
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output_text == ANSWER
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens > 0


def test_socketio_generate_reasoning_events(srv: Server) -> None:
    from tests.support.recorder import listen

    client, recorder = listen(srv.url, ("token", "reasoning", "generate_done"), auth={"rooms": []})
    try:
        done = client.call("generate", {"model": THINKER, "messages": ASK, "max_tokens": 40, "id": "t-1"}, timeout=120)
    finally:
        client.disconnect()
    assert (done["reasoning"], done["text"]) == (REASONING, ANSWER)
    assert "".join(d["delta"] for _, d in recorder.of("reasoning")) == REASONING
    assert "".join(d["delta"] for _, d in recorder.of("token")) == ANSWER


@pytest.fixture(scope="module")
def llamacpp_srv(tmp_path_factory: pytest.TempPathFactory, thinker: Path) -> Iterator[Server]:
    """The thinking model as an f32 GGUF (bench/gguf_model.py's writer), served by llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    from bench.gguf_model import write_gguf

    models = tmp_path_factory.mktemp("reasoning-gguf")
    write_gguf(thinker, models / THINKER / f"{THINKER}-f32.gguf")
    server = start_server(
        tmp_path_factory.mktemp("reasoning-llamacpp"),
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_DEFAULT_MODEL=str(models / THINKER),
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_LLAMACPP_THREADS="1",
    )
    yield server
    stop_server(server, wait=False)


def test_llamacpp_reasoning_apart(llamacpp_srv: Server) -> None:
    """The same split on the llama.cpp backend: its text comes from the same tokenizer and text step."""
    client = openai.OpenAI(base_url=llamacpp_srv.base_url, api_key="not-needed", max_retries=0, timeout=120)
    assert requests.get(f"{llamacpp_srv.url}/api/models/{THINKER}", timeout=10).json()["format"] == "gguf"
    reply = client.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40)  # type: ignore[arg-type]
    assert (reasoning_of(reply.choices[0].message), reply.choices[0].message.content) == (REASONING, ANSWER)
    off = client.chat.completions.create(
        model=THINKER,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert (reasoning_of(off.choices[0].message), off.choices[0].message.content) == (None, ANSWER)


def test_second_turn_with_the_answer_sent_back(oai: openai.OpenAI) -> None:
    """The SDK echoes ``reasoning_content`` when a reply is appended to the conversation: accepted (and
    given to the template, which may drop it, as Qwen3's does for earlier turns)."""
    first = oai.chat.completions.create(model=THINKER, messages=ASK, max_tokens=40)  # type: ignore[arg-type]
    history = [*ASK, first.choices[0].message, {"role": "user", "content": "And the sea?"}]
    second = oai.chat.completions.create(model=THINKER, messages=history, max_tokens=40)  # type: ignore[arg-type]
    assert (reasoning_of(second.choices[0].message), second.choices[0].message.content) == (REASONING, ANSWER)
