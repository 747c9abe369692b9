"""Validation in process: every refusal below happens before (or at) the engine's door, and names
what was wrong: the parameter, the code, the envelope (OpenAI's, or Anthropic's on /v1/messages).

These ran only against a real Gunicorn before; nothing in them needs one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.inprocess.helpers import BERT, LLAMA, chat_body, error_of, post

COMPLETION = {"model": LLAMA, "prompt": "hi", "max_tokens": 2}
MESSAGES = {"model": LLAMA, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": LLAMA, "input": "hi", "max_output_tokens": 2}


# ---- JSON itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", json.dumps(chat_body())[:-1] + ', "keep_alive": Infinity}'),
        ("/v1/chat/completions", json.dumps(chat_body())[:-1] + ', "logit_bias": {"1": -Infinity}}'),
        ("/v1/completions", json.dumps(COMPLETION)[:-1] + ', "keep_alive": NaN}'),
        ("/v1/responses", json.dumps(RESPONSES)[:-1] + ', "temperature": NaN}'),
        ("/api/models/load", f'{{"model": "{LLAMA}", "keep_alive": 1e999}}'),  # overflows to inf
    ],
)
def test_nan_and_infinity_are_refused_at_parse_time(client: FlaskClient, path: str, body: str) -> None:
    r = post(client, path, body)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json", (r.status_code, r.get_data(as_text=True))


def test_anthropic_errors_keep_anthropic_shape(client: FlaskClient) -> None:
    r = post(client, "/v1/messages", json.dumps(MESSAGES)[:-1] + ', "metadata": {"score": NaN}}')
    body = r.get_json()
    assert r.status_code == 400 and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error" and "NaN" in body["error"]["message"], body
    r = client.get("/v1/messages")  # Werkzeug's own 405, in Anthropic's shape too
    assert r.status_code == 405 and r.get_json()["type"] == "error", r.get_json()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("[" * 100_000 + "]" * 100_000, "nesting_too_deep"),  # a RecursionError (500) in the parser once
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),  # JSON, but not an object
        ("", "invalid_json"),
    ],
)
def test_bodies_that_are_not_a_json_object(client: FlaskClient, body: str, code: str) -> None:
    r = post(client, "/v1/chat/completions", body)
    assert r.status_code == 400 and error_of(r)["code"] == code, r.get_json()


def test_a_lone_surrogate_is_refused(client: FlaskClient) -> None:
    r = post(client, "/v1/chat/completions", json.dumps(chat_body())[:-1] + ', "user": "\\ud800"}')
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json", r.get_json()
    assert "surrogate" in error_of(r)["message"]


# ---- the schema: strict types, unknown fields ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat_body(stream="yes"), "stream"),
        ("/v1/chat/completions", chat_body(max_tokens="2"), "max_tokens"),
        ("/v1/chat/completions", chat_body(n=1.0), "n"),
        ("/v1/chat/completions", chat_body(messages=[{"role": "user"}]), "messages.0.content"),
        (
            "/v1/chat/completions",
            chat_body(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]),
            "messages.1.tool_call_id",
        ),
        ("/v1/chat/completions", chat_body(temprature=0.5), "temprature"),  # a typo is named, never ignored
        ("/v1/completions", {**COMPLETION, "seed": "7"}, "seed"),
        ("/v1/embeddings", {"model": BERT, "input": "hi", "dimensions": 16.0}, "dimensions"),
        ("/v1/responses", {**RESPONSES, "stream": "yes"}, "stream"),
        ("/api/models/load", {"model": LLAMA, "warmup": "true"}, "warmup"),
    ],
)
def test_types_are_strict_and_unknown_fields_named(
    client: FlaskClient, path: str, body: dict[str, Any], param: str
) -> None:
    r = post(client, path, body)
    assert r.status_code == 400 and r.content_type.startswith("application/json"), r.get_data(as_text=True)
    assert error_of(r)["param"] == param, error_of(r)


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        (
            "/v1/chat/completions",
            chat_body(audio={"voice": "alloy", "format": "mp3"}),
            "audio",
            "unsupported_parameter",
        ),
        ("/v1/chat/completions", chat_body(reasoning_effort="high"), "reasoning_effort", "unsupported_parameter"),
        ("/v1/chat/completions", chat_body(top_logprobs=2), "top_logprobs", "invalid_value"),
        ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
        ("/v1/completions", {**COMPLETION, "echo": True}, "echo", "unsupported_parameter"),
        (
            "/v1/responses",
            {**RESPONSES, "conversation": "conv_1"},  # previous_response_id is served (store: true)
            "conversation",
            "unsupported_parameter",
        ),
    ],
)
def test_what_the_schema_cannot_check_is_refused_by_name(
    client: FlaskClient, path: str, body: dict[str, Any], param: str, code: str
) -> None:
    r = post(client, path, body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert (error_of(r)["param"], error_of(r)["code"]) == (param, code), error_of(r)


# ---- against the model: vocabulary, context, budget ------------------------------------------------


def test_logit_bias_and_top_k_are_held_to_the_vocabulary(client: FlaskClient) -> None:
    r = post(client, "/v1/chat/completions", chat_body(logit_bias={"999999": 1}))
    assert r.status_code == 400 and error_of(r)["param"] == "logit_bias", r.get_json()
    r = post(client, "/v1/chat/completions", chat_body(top_k=10_000_000))
    assert r.status_code == 400 and error_of(r)["param"] == "top_k" and "vocabulary" in error_of(r)["message"]
    r = post(client, "/v1/completions", {**COMPLETION, "prompt": [1, 2, 10_000_000]})
    assert (
        r.status_code == 400 and error_of(r)["param"] == "prompt" and "outside the vocabulary" in error_of(r)["message"]
    )


@pytest.mark.timing
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(client: FlaskClient, path: str) -> None:
    """About 1 MB of text cannot fit 512 tokens: refused from its length (the message counts characters,
    which only the check before the tokenizer does)."""
    text = "hello " * 170_000
    body = (
        {**COMPLETION, "prompt": text}
        if path == "/v1/completions"
        else chat_body(messages=[{"role": "user", "content": text}])
    )
    r = post(client, path, body)
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert error_of(r)["code"] == "context_length_exceeded" and "characters" in error_of(r)["message"]


def test_a_prompt_that_fills_the_context_leaves_no_room(client: FlaskClient) -> None:
    """600 token ids into a 512-token context: no completion budget is left."""
    r = post(client, "/v1/completions", {"model": LLAMA, "prompt": [1] * 600})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded", r.get_json()


def test_input_counts_are_checked_before_any_tokenizing(client: FlaskClient) -> None:
    """20,000 prompts: refused for their number (the engine runs 8 here) before any is looked at."""
    prompts = [[-1]] + [[1, 2]] * 19_999
    r = post(client, "/v1/completions", {"model": LLAMA, "prompt": prompts, "max_tokens": 2})
    assert r.status_code == 400 and error_of(r)["param"] == "n" and "20000 sequences" in error_of(r)["message"]
    r = post(client, "/v1/chat/completions", chat_body(n=9))
    assert r.status_code == 400 and error_of(r)["param"] == "n" and "at most 8" in error_of(r)["message"]


def test_the_token_budget(client: FlaskClient) -> None:
    r = post(client, "/v1/chat/completions", chat_body(max_tokens=401))  # IMPETUS_MAX_TOKENS_LIMIT here: 400
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens" and "400" in error_of(r)["message"]
    r = post(client, "/v1/chat/completions", chat_body(n=4, max_tokens=300))  # 1,200 > IMPETUS_MAX_REQUEST_TOKENS
    assert r.status_code == 400 and error_of(r)["param"] == "n" and "1200 completion tokens" in error_of(r)["message"]


def test_an_empty_prompt_is_refused(client: FlaskClient) -> None:
    r = post(client, "/v1/completions", {**COMPLETION, "prompt": ""})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt", r.get_json()
    r = post(client, "/v1/completions", {**COMPLETION, "prompt": []})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt", r.get_json()


# ---- models: unknown, wrong kind -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["no-such-model", "../tiny-llama", "/etc/passwd", "~/x"])
def test_an_unknown_or_unreachable_model_gets_one_uniform_404(client: FlaskClient, model: str) -> None:
    r = post(client, "/v1/chat/completions", chat_body(model=model))
    error = error_of(r)
    assert r.status_code == 404 and (error["param"], error["code"]) == ("model", "model_not_found"), error
    assert "does not exist or you do not have access to it" in error["message"]


def test_an_embedding_model_serves_embeddings_only(client: FlaskClient) -> None:
    r = post(client, "/v1/chat/completions", chat_body(model=BERT))
    assert r.status_code == 400 and error_of(r)["code"] == "model_not_supported", r.get_json()
    r = post(client, "/v1/messages", {**MESSAGES, "model": BERT})
    assert r.status_code == 400 and "embedding model" in r.get_json()["error"]["message"], r.get_json()


def test_embeddings_dimensions_and_inputs(client: FlaskClient) -> None:
    r = post(client, "/v1/embeddings", {"model": BERT, "input": "the cat", "dimensions": 64})
    assert r.status_code == 400 and error_of(r)["param"] == "dimensions" and "have 32" in error_of(r)["message"]
    r = post(client, "/v1/embeddings", {"model": BERT, "input": "the cat", "dimensions": 16})  # not Matryoshka
    assert r.status_code == 400 and "cannot be shortened" in error_of(r)["message"], r.get_json()
    r = post(client, "/v1/embeddings", {"model": BERT, "input": ["the cat"] * 3000})
    assert r.status_code == 400 and "inputs per request" in error_of(r)["message"], r.get_json()
    r = post(client, "/v1/embeddings", {"model": BERT, "input": [[2, 3] * 40]})  # 80 tokens, 64 positions
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded", r.get_json()


# ---- HTTP around the body: content type, size, unknown routes ---------------------------------------


def test_a_body_that_is_not_json_is_a_415(client: FlaskClient) -> None:
    r = client.post("/v1/chat/completions", data=json.dumps(chat_body()), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["type"] == "invalid_request_error", r.get_json()


def test_a_body_over_the_size_limit_is_a_413(make_app: Any) -> None:
    client = make_app(max_request_bytes=4096).test_client()
    r = post(client, "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x" * 8192}]))
    assert r.status_code == 413 and "error" in r.get_json(), r.get_json()


def test_unknown_routes_and_methods_answer_in_the_envelope(client: FlaskClient) -> None:
    r = client.get("/v1/no-such-route")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error", r.get_json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.get_json(), r.get_json()
    r = client.get("/v1/models/no-such-model")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found", r.get_json()


def test_the_operators_routes_validate_too(client: FlaskClient) -> None:
    r = client.delete("/api/requests/not-an-id")
    assert r.status_code == 400 and error_of(r)["param"] == "id", r.get_json()
    r = client.delete("/api/requests/" + "0" * 32)
    assert r.status_code == 404 and error_of(r)["code"] == "request_not_found", r.get_json()
    r = post(client, "/api/models/unload", {"model": "no-such-model"})
    assert r.status_code == 404 and error_of(r)["param"] == "model", r.get_json()
    r = client.get("/api/models/no-such-model/benchmark")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found", r.get_json()
