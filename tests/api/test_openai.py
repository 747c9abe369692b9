"""The OpenAI endpoints against the real Gunicorn server, through the official `openai` SDK."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.server import Server

pytestmark = pytest.mark.server

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEST_MODELS_DIR / DEFAULT_MODEL)


def test_chat_answers_paris_with_true_usage(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=30)
    choice = reply.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    prompt = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(prompt)
    answer_tokens = len(tokenizer.encode(choice.message.content, add_special_tokens=False))
    assert reply.usage.completion_tokens == answer_tokens + 1  # the answer and its end-of-turn token
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_matches_plain_and_reports_usage(client) -> None:  # type: ignore[no-untyped-def]
    plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CAPITAL,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completion_hits_length(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].text.strip()


def test_completion_with_several_prompts(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.completions.create(
        model=DEFAULT_MODEL, prompt=["One, two,", "Red, green,"], max_tokens=3, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == 6
    alone = client.completions.create(model=DEFAULT_MODEL, prompt="Red, green,", max_tokens=3, temperature=0)
    assert reply.choices[1].text == alone.choices[0].text


def test_completion_stream_with_token_prompt(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("The capital of France is")
    chunks = list(client.completions.create(model=DEFAULT_MODEL, prompt=ids, max_tokens=4, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    plain = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert text == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models(client) -> None:  # type: ignore[no-untyped-def]
    ids = [m.id for m in client.models.list().data]
    assert DEFAULT_MODEL in ids
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_seed_reproduces_sampling(client) -> None:  # type: ignore[no-untyped-def]
    def sample(seed: int) -> str:
        reply = client.completions.create(
            model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=seed
        )
        return reply.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_split_across_tokens_is_never_emitted(client, stream: bool) -> None:  # type: ignore[no-untyped-def]
    # Greedy answer: "The capital of France is Paris." — "is Pa" spans the tokens " is" and " Paris".
    args = dict(model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=30, stop=["is Pa", "zzz"])
    if stream:
        chunks = list(client.chat.completions.create(**args, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = client.chat.completions.create(**args)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == "The capital of France "
    assert finish == "stop"


def test_unknown_model_is_404(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=CAPITAL)
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": "high"}, "top_p"),
        ({"n": 1000}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ],
)
def test_bad_parameters_are_400_naming_the_param(client, extra: dict, param: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, extra_body=extra)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param


def test_unknown_parameter_is_named(server: Server) -> None:
    r = requests.post(
        f"{server.base_url}/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": CAPITAL, "temprature": 0.5},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temprature"
    assert r.json()["error"]["code"] == "unknown_parameter"


def test_missing_messages_and_wrong_types(server: Server) -> None:
    r = requests.post(f"{server.base_url}/chat/completions", json={"model": DEFAULT_MODEL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = requests.post(
        f"{server.base_url}/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"


def test_malformed_json_is_400(server: Server) -> None:
    r = requests.post(
        f"{server.base_url}/chat/completions",
        data="{not json",
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    r = requests.post(f"{server.base_url}/completions", json=[1, 2], timeout=30)
    assert r.status_code == 400


def test_prompt_longer_than_context_is_400_not_truncated(client) -> None:  # type: ignore[no-untyped-def]
    context = client.models.retrieve(DEFAULT_MODEL).model_extra["context_length"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=DEFAULT_MODEL, prompt=[1] * (context + 1), max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=context)
    assert info.value.body["code"] == "context_length_exceeded"


def test_unknown_route_and_wrong_method_use_the_envelope(server: Server) -> None:
    r = requests.get(f"{server.base_url}/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = requests.get(f"{server.base_url}/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_sse_wire_format(server: Server) -> None:
    body = {"model": DEFAULT_MODEL, "messages": CAPITAL, "max_tokens": 5, "temperature": 0, "stream": True}
    with requests.post(f"{server.base_url}/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["finish_reason"] is None


def test_chat_logprobs_match_the_tokens(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=30, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5
        assert bytes(entry.bytes).decode() == entry.token


def test_chat_logprobs_stream(client) -> None:  # type: ignore[no-untyped-def]
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=30, logprobs=True, stream=True
        )
    )
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(tokens) == "The capital of France is Paris."


def test_completion_logprobs_shape(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_n_choices(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=8, n=3, seed=11, temperature=1.0
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1
    again = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=8, n=3, seed=11, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    one = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=8, n=1, seed=11, temperature=1.0
    )
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=8, n=2, temperature=0, stream=True
        )
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_always_validates(client, temperature: float) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        temperature=temperature,
        max_tokens=120,
        seed=3,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age", "city"}
    assert (
        isinstance(person["name"], str)
        and isinstance(person["age"], int)
        and person["city"] in PERSON["properties"]["city"]["enum"]
    )  # type: ignore[index]
    assert reply.choices[0].finish_reason == "stop"


def test_json_object_output_parses(client) -> None:  # type: ignore[no-untyped-def]
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            temperature=0,
            max_tokens=60,
            stream=True,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            response_format={"type": "json_object"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    if finish == ["stop"]:
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a valid prefix of an object
        assert text.startswith("{")


def test_bad_schema_is_400(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CAPITAL,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}},
        )
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, response_format={"type": "json_schema"})
    assert info.value.body["param"].startswith("response_format")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_returns_a_valid_call(client, stream: bool) -> None:  # type: ignore[no-untyped-def]
    args = dict(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        temperature=0,
        max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    if stream:
        chunks = list(client.chat.completions.create(**args, stream=True))
        calls = [
            tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls
        ]
        finish = chunks[-1].choices[0].finish_reason
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    else:
        reply = client.chat.completions.create(**args)
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
        assert reply.choices[0].message.content is None
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    arguments = json.loads(calls[0].function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F")


def test_required_tool_choice_and_the_round_trip(client) -> None:  # type: ignore[no-untyped-def]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60, tool_choice="required"
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    follow_up = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "unit": "C"}'},
    ]
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=follow_up, tools=[WEATHER, TIME], tool_choice="none", temperature=0, max_tokens=20
    )
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_auto_tool_calls_are_parsed_from_markers() -> None:
    from gerdsen_ai_server.serving.tools import ToolCallSplitter, ToolPlan

    splitter = ToolCallSplitter(ToolPlan("auto"))
    pieces = [
        "Let me check. <tool",
        '_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_c',
        "all> and <tool_call>not json</tool_call>",
        " done",
    ]
    content = "".join(splitter.feed(p) for p in pieces) + splitter.feed("", final=True)
    assert content == "Let me check.  and <tool_call>not json</tool_call> done"
    assert [c.function.name for c in splitter.calls] == ["get_weather"]
    assert json.loads(splitter.calls[0].function.arguments) == {"city": "Paris"}


def test_tool_choice_errors(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tool_choice="required")
    assert info.value.body["param"] == "tool_choice"


def test_embeddings(client) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue rose by 4%."]
    reply = client.embeddings.create(model=DEFAULT_MODEL, input=texts)
    vectors = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == [0, 1, 2] and vectors.shape == (3, 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 10
    b64 = client.embeddings.create(model=DEFAULT_MODEL, input=texts[0], encoding_format="base64")
    import base64

    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)
    ids = client.embeddings.create(model=DEFAULT_MODEL, input=[[1, 2, 3], [4, 5]])
    assert len(ids.data) == 2
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=DEFAULT_MODEL, input="x", dimensions=8)
    assert info.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=DEFAULT_MODEL, input=[])
    assert info.value.body["param"] == "input"


def test_sampling_extensions_take_effect(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    def complete(**kw) -> str:  # type: ignore[no-untyped-def]
        return (
            client.completions.create(model=DEFAULT_MODEL, prompt="One, two, three, four,", max_tokens=12, **kw)
            .choices[0]
            .text
        )

    greedy = complete(temperature=0)
    assert complete(temperature=1.0, seed=5, extra_body={"top_k": 1}) == greedy  # top-1 sampling is greedy
    assert complete(temperature=1.0, seed=5, extra_body={"min_p": 1.0}) == greedy
    token = tokenizer.encode(" banana")[0]
    forced = client.completions.create(
        model=DEFAULT_MODEL, prompt="Hi", max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    assert complete(temperature=0, frequency_penalty=2.0) != greedy
    assert complete(temperature=0, presence_penalty=2.0) != greedy
    assert complete(temperature=0, extra_body={"repetition_penalty": 1.5}) != greedy
