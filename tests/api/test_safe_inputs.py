"""Hostile input on the real server (issue 23, item 8): numbers that are not JSON (NaN, Infinity),
deep nesting, odd logit_bias keys, lax types, input counts and sizes refused before the tokenizer
runs, logprobs that stay JSON, and chat templates that would run forever."""

from __future__ import annotations

import json
import shutil
import threading
import time
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import requests
import socketio

from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama

pytestmark = pytest.mark.server

CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"Content-Type": "application/json"}


def post(server: Server, path: str, body: str | dict[str, Any], timeout: float = 60) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(server.url + path, data=data.encode(), headers=JSON, timeout=timeout)


def strict_json(text: str) -> Any:
    """Parse as JSON is defined (RFC 8259): NaN and Infinity are not numbers there, nor in JS."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def error_of(response: requests.Response) -> dict[str, Any]:
    """The error object, in OpenAI's envelope or Anthropic's."""
    body = strict_json(response.text)
    assert "error" in body, body
    return body["error"]


# ---- NaN and Infinity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/models/load", f'{{"model": "{DEFAULT_MODEL}", "keep_alive": NaN}}'),
        ("/api/models/load", f'{{"model": "{DEFAULT_MODEL}", "keep_alive": 1e999}}'),  # overflows to inf
        ("/v1/chat/completions", json.dumps(CHAT)[:-1] + ', "keep_alive": Infinity}'),
        ("/v1/chat/completions", json.dumps(CHAT)[:-1] + ', "logit_bias": {"1": -Infinity}}'),
        (
            "/v1/chat/completions",
            json.dumps(CHAT)[:-1] + ', "tools": [{"type": "function", "function": {"name": "f", '
            '"parameters": {"type": "object", "properties": {"x": {"type": "number", "default": NaN}}}}}]}',
        ),
        ("/v1/completions", f'{{"model": "{DEFAULT_MODEL}", "prompt": "hi", "max_tokens": 2, "keep_alive": NaN}}'),
        (
            "/v1/messages",
            f'{{"model": "{DEFAULT_MODEL}", "max_tokens": 2, "messages": [{{"role": "user", '
            '"content": "hi"}], "metadata": {"score": NaN}}',
        ),
        (
            "/v1/responses",
            f'{{"model": "{DEFAULT_MODEL}", "input": "hi", "max_output_tokens": 2, '
            '"text": {"format": {"type": "json_schema", "name": "n", "schema": {"maximum": Infinity}}}}',
        ),
    ],
)
def test_nan_and_infinity_are_refused_at_parse_time(server: Server, path: str, body: str) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = error_of(r)
    if path != "/v1/messages":
        assert error["code"] == "invalid_json", error
    # The keep-alive never reached a model: the listing the dashboard reads is still JSON.
    listing = requests.get(server.url + "/api/models", timeout=10)
    strict_json(listing.text)


def test_socketio_generate_refuses_nan(server: Server) -> None:
    """python-socketio parses the payload with Python's json, NaN included: the schema refuses it."""
    client = socketio.Client(reconnection=False)
    client.connect(server.url, transports=["websocket"], auth={"rooms": []}, wait_timeout=30)
    try:
        ack = client.call("generate", {**CHAT, "keep_alive": float("nan")}, timeout=60)
        assert ack.get("error") and "non-finite" in ack["error"]["message"] and "keep_alive" in ack["error"]["message"]
        ack = client.call(
            "generate",
            {
                **CHAT,
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "default": float("inf")}},
                    }
                ],
            },
            timeout=60,
        )
        assert ack.get("error") and "non-finite" in ack["error"]["message"], ack
    finally:
        client.disconnect()
    strict_json(requests.get(server.url + "/api/models", timeout=10).text)


# ---- nesting ---------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_a_400(server: Server) -> None:
    r = post(server, "/v1/chat/completions", nested(100_000))  # a RecursionError (500) in the parser before
    assert r.status_code == 400 and error_of(r)["code"] == "nesting_too_deep", (r.status_code, r.text[:300])
    r = post(server, "/v1/messages", nested(100_000))
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error", (r.status_code, r.text[:300])
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(150):  # within the parser's reach, beyond any real schema
        deep = {"type": "object", "properties": {"x": deep}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    r = post(server, "/v1/chat/completions", {**CHAT, "tools": tools})
    assert r.status_code == 400 and error_of(r)["code"] == "nesting_too_deep", (r.status_code, r.text[:300])
    # A past tool call's arguments are JSON in a string: parsed with the same limits.
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": nested(100_000)}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1"},
    ]
    r = post(server, "/v1/chat/completions", {**CHAT, "messages": messages})
    assert r.status_code == 400 and error_of(r)["param"] == "messages", (r.status_code, r.text[:300])


# ---- logit_bias keys --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["²", "٣", "1" * 5000])  # isdigit() is true of each; int() fails or reads 3
def test_logit_bias_keys_must_be_ascii_token_ids(server: Server, key: str) -> None:
    r = post(server, "/v1/chat/completions", {**CHAT, "logit_bias": {key: 1}})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = error_of(r)
    assert error["param"] == "logit_bias" and len(error["message"]) < 300, error


# ---- strict types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "2"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "n": 1.0}, "n"),
        ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages.0.content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "assistant"}, {"role": "user", "content": "x"}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]},
            "messages.1.tool_call_id",
        ),
        ("/v1/completions", {"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 2, "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 2, "seed": "7"}, "seed"),
        ("/v1/embeddings", {"model": DEFAULT_MODEL, "input": "hi", "dimensions": 576.0}, "dimensions"),
        (
            "/v1/messages",
            {"model": DEFAULT_MODEL, "max_tokens": 2, "stream": "yes", "messages": [{"role": "user", "content": "hi"}]},
            None,
        ),
        ("/v1/responses", {"model": DEFAULT_MODEL, "input": "hi", "max_output_tokens": 2, "stream": "yes"}, "stream"),
        ("/api/models/load", {"model": DEFAULT_MODEL, "warmup": "true"}, "warmup"),
    ],
)
def test_types_are_strict_where_openai_is(server: Server, path: str, body: dict[str, Any], param: str | None) -> None:
    r = post(server, path, body)
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/json"), (
        r.status_code,
        r.text[:300],
    )
    error = error_of(r)
    if param is not None:
        assert error["param"] == param, error
    else:  # Anthropic's shape names no param
        assert error["type"] == "invalid_request_error" and "stream" in error["message"], error


def test_strict_but_not_stricter_than_the_sdks(client: Any, server: Server) -> None:
    """A string is not a bool, but an int is a valid float, as the SDKs send ``temperature=1``."""
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=CHAT["messages"], max_tokens=2, extra_body={"stream": "yes"}
        )
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CHAT["messages"],
        max_tokens=2,
        temperature=1,
        top_p=1,
        presence_penalty=0,
        logit_bias={"0": -1},
    )
    assert reply.choices[0].finish_reason == "length"
    r = post(
        server,
        "/v1/messages",
        {"model": DEFAULT_MODEL, "max_tokens": 2, "temperature": 1, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200, r.text[:300]


# ---- counts and sizes before tokenizing ---------------------------------------------------------


@pytest.mark.timing
def test_input_counts_are_checked_before_any_tokenizing(server: Server) -> None:
    """20,000 prompts: refused for their number before any is looked at (the first one, an invalid
    token id, would be the first thing tokenizing finds)."""
    prompts = [[-1]] + [[1, 2]] * 19_999
    r = post(server, "/v1/completions", {"model": DEFAULT_MODEL, "prompt": prompts, "max_tokens": 2})
    assert r.status_code == 400 and error_of(r)["param"] == "n", (r.status_code, r.text[:300])
    assert "20000 sequences" in error_of(r)["message"]
    r = post(server, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": prompts})
    assert r.status_code == 400 and "inputs per request" in error_of(r)["message"], (r.status_code, r.text[:300])
    started = time.monotonic()
    r = post(server, "/v1/completions", {"model": DEFAULT_MODEL, "prompt": ["hello world"] * 20_000, "max_tokens": 2})
    assert r.status_code == 400 and error_of(r)["param"] == "n" and time.monotonic() - started < 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(server: Server, path: str) -> None:
    """6 MB of text cannot fit 8,192 tokens: refused from its length (tokenizing it took seconds)."""
    text = "hello " * 1_000_000
    body = (
        {"model": DEFAULT_MODEL, "prompt": text, "max_tokens": 2}
        if path == "/v1/completions"
        else {**CHAT, "messages": [{"role": "user", "content": text}]}
    )
    r = post(server, path, body)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = error_of(r)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"], error


# ---- logprobs stay JSON -------------------------------------------------------------------------


def test_logprobs_under_a_grammar_are_finite(server: Server) -> None:
    """A grammar masks tokens to -inf; their top_logprobs entries are OpenAI's -9999.0, not -Infinity."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    r = post(
        server,
        "/v1/chat/completions",
        {
            **CHAT,
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}},
        },
    )
    assert r.status_code == 200, r.text[:300]
    content = strict_json(r.text)["choices"][0]["logprobs"]["content"]
    values = [t["logprob"] for t in content] + [alt["logprob"] for t in content for alt in t["top_logprobs"]]
    assert -9999.0 in values and min(values) >= -9999.0


# ---- chat templates that would run forever -------------------------------------------------------

SLOW_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
POWER_TEMPLATE = "{{ 9 ** (9 ** 9) }}"  # one C call, folded at compile time: no deadline could stop it
REPEAT_TEMPLATE = "{% set n = 10 ** 12 %}{{ 'x' * n }}"


def with_template(folder: Path, template: str) -> Path:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def template_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Tiny models with hostile chat templates, 4 request threads, a 0.5 s template deadline."""
    root = tmp_path_factory.mktemp("templates")
    default = build_tiny_llama(root / "tiny-default", TEST_MODELS_DIR / DEFAULT_MODEL)
    for name, template in (
        ("tiny-slow", SLOW_TEMPLATE),
        ("tiny-power", POWER_TEMPLATE),
        ("tiny-repeat", REPEAT_TEMPLATE),
    ):
        shutil.copytree(default, root / name)
        with_template(root / name, template)
    srv = start_server(
        tmp_path_factory.mktemp("template-server"),
        IMPETUS_MODELS_DIR=str(root),
        IMPETUS_DEFAULT_MODEL=str(default),
        IMPETUS_THREADS="4",
        IMPETUS_TEMPLATE_TIMEOUT="0.5",
    )
    yield srv
    stop_server(srv, wait=False)


def cpu_seconds(server: Server) -> float:
    process = psutil.Process(server.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


@pytest.mark.timing
def test_a_slow_chat_template_is_stopped_and_its_thread_freed(template_server: Server) -> None:
    """More hostile requests than the server has threads: each ends at the deadline with a clear
    error, and afterwards the server answers and idles (no thread left spinning)."""
    results: list[requests.Response | Exception] = []

    def hostile() -> None:
        try:
            results.append(post(template_server, "/v1/chat/completions", {**CHAT, "model": "tiny-slow"}, timeout=30))
        except requests.RequestException as exc:
            results.append(exc)

    threads = [threading.Thread(target=hostile) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 6
    for r in results:
        assert isinstance(r, requests.Response) and r.status_code == 500, r
        assert error_of(r)["code"] == "chat_template_timeout" and "IMPETUS_TEMPLATE_TIMEOUT" in error_of(r)["message"]
    assert requests.get(template_server.url + "/health/live", timeout=2).status_code == 200
    r = post(template_server, "/v1/chat/completions", {**CHAT, "model": "tiny-default"})
    assert r.status_code == 200, r.text[:300]
    before = cpu_seconds(template_server)
    time.sleep(2)
    assert cpu_seconds(template_server) - before < 1.0  # a template loop left running would use ~2 s


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages/count_tokens", {"model": "tiny-slow", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"model": "tiny-slow", "input": "hi", "max_output_tokens": 2}),
    ],
)
def test_every_chat_shaped_api_renders_under_the_deadline(
    template_server: Server, path: str, body: dict[str, Any]
) -> None:
    r = post(template_server, path, body, timeout=30)
    assert r.status_code == 500 and "IMPETUS_TEMPLATE_TIMEOUT" in error_of(r)["message"], (r.status_code, r.text)


@pytest.mark.parametrize("model", ["tiny-power", "tiny-repeat"])
def test_a_template_computing_a_huge_value_is_refused(template_server: Server, model: str) -> None:
    r = post(template_server, "/v1/chat/completions", {**CHAT, "model": model}, timeout=30)
    assert r.status_code == 500 and error_of(r)["code"] == "chat_template_unsafe", (r.status_code, r.text[:300])


@pytest.mark.timing
def test_the_deadline_costs_little_on_a_normal_template() -> None:
    """The SmolLM2 template over a 21-message chat, with and without the deadline's tracing."""
    from mlx_lm.utils import load_tokenizer

    from gerdsen_ai_server.serving.chat_template import install_bounded_sandbox, render_chat_template

    tokenizer = load_tokenizer(TEST_MODELS_DIR / DEFAULT_MODEL)
    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[i % 2], "content": "hello there " * 20} for i in range(20)
    ]
    install_bounded_sandbox()

    def stock() -> str:
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def bounded() -> str:
        return render_chat_template(tokenizer, messages, {}, 5.0)

    assert bounded() == stock()
    per_call = {f.__name__: min(timeit.repeat(f, number=50, repeat=5)) / 50 for f in (stock, bounded)}
    assert per_call["bounded"] - per_call["stock"] < 0.002, per_call  # measured: +0.25 ms (0.22 → 0.47 ms)
