"""The serving layer end to end in process, on the session's real engine and tiny models: each API's
answer shape (JSON and Server-Sent Events), the running-request table and an operator's cancel, and
a stream's sequences freed when its response closes early."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.inprocess.helpers import BERT, LLAMA, chat_body, post

NO_END = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: a random model may otherwise stop at once


def sse_payloads(response: TestResponse) -> list[Any]:
    """Each ``data:`` payload of an SSE answer, JSON-decoded (``[DONE]`` kept as the string)."""
    text = response.get_data(as_text=True)
    return [
        line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def event_names(response: TestResponse) -> list[str]:
    return [line[7:] for line in response.get_data(as_text=True).splitlines() if line.startswith("event: ")]


def test_chat_completion(client: FlaskClient) -> None:
    r = post(client, "/v1/chat/completions", chat_body(max_tokens=3, logprobs=True, top_logprobs=2))
    body = r.get_json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-"), body
    assert body["system_fingerprint"].startswith("fp_impetus_") and body["model"] == LLAMA
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert (
        0 < usage["completion_tokens"] <= 3
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    assert len(choice["logprobs"]["content"]) == usage["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])


def test_chat_stream_ends_with_done_and_usage(client: FlaskClient) -> None:
    r = post(
        client,
        "/v1/chat/completions",
        chat_body(max_tokens=4, n=2, stream=True, stream_options={"include_usage": True}),
    )
    assert r.status_code == 200 and r.mimetype == "text/event-stream" and r.headers["X-Accel-Buffering"] == "no"
    payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 8
    assert all(c["usage"] is None for c in chunks[:-1])  # null but present until the last, as OpenAI sends it
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 2


def test_completions_with_several_prompts_and_logprobs(client: FlaskClient) -> None:
    r = post(
        client,
        "/v1/completions",
        {"model": LLAMA, "prompt": ["one", "two"], "max_tokens": 2, "logprobs": 1, "logit_bias": NO_END},
    )
    body = r.get_json()
    assert r.status_code == 200 and body["object"] == "text_completion", body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["tokens"]) == 2 for c in body["choices"]), body["choices"]
    assert body["usage"]["completion_tokens"] == 4


def test_embeddings_as_floats_and_base64(client: FlaskClient) -> None:
    r = post(client, "/v1/embeddings", {"model": BERT, "input": ["the cat sat", "a red sky"]})
    body = r.get_json()
    assert r.status_code == 200 and body["model"] == BERT and [d["index"] for d in body["data"]] == [0, 1], body
    vector = np.asarray(body["data"][0]["embedding"])
    assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1) < 1e-4  # mean pooling, normalized
    r = post(client, "/v1/embeddings", {"model": BERT, "input": "the cat sat", "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(r.get_json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vector, atol=1e-5)
    listed = {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}
    assert listed[BERT]["kind"] == "embedding" and listed[BERT]["dimensions"] == 32


def test_anthropic_message_and_its_events(client: FlaskClient) -> None:
    body = {"model": LLAMA, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    r = post(client, "/v1/messages", body)
    message = r.get_json()
    assert r.status_code == 200 and message["type"] == "message" and message["id"].startswith("msg_"), message
    assert message["stop_reason"] in ("max_tokens", "end_turn") and message["usage"]["input_tokens"] > 0
    r = post(client, "/v1/messages", {**body, "stream": True})
    names = event_names(r)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    count = post(client, "/v1/messages/count_tokens", {"model": LLAMA, "messages": body["messages"]}).get_json()
    assert count["input_tokens"] == message["usage"]["input_tokens"]


def test_responses_and_their_events(client: FlaskClient) -> None:
    body = {"model": LLAMA, "input": "hi", "max_output_tokens": 3, "instructions": "Be brief."}
    r = post(client, "/v1/responses", body)
    response = r.get_json()
    assert r.status_code == 200 and response["object"] == "response" and response["store"] is False, response
    assert response["status"] in ("completed", "incomplete") and response["instructions"] == "Be brief."
    r = post(client, "/v1/responses", {**body, "stream": True})
    names = event_names(r)
    assert names[:2] == ["response.created", "response.in_progress"], names
    assert names[-1] in ("response.completed", "response.incomplete"), names


def _stream(client: FlaskClient, max_tokens: int) -> tuple[TestResponse, Iterator[bytes]]:
    r = client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=max_tokens, stream=True, logit_bias=NO_END), buffered=False
    )
    assert r.status_code == 200
    chunks = iter(r.response)
    assert b"assistant" in next(chunks)  # the first chunk: the request is running
    return r, chunks


def test_an_operator_cancels_a_running_stream(client: FlaskClient) -> None:
    r, chunks = _stream(client, 400)
    running = client.get("/api/requests").get_json()["data"]
    assert len(running) == 1 and running[0]["kind"] == "chat" and running[0]["model"] == LLAMA, running
    cancelled = client.delete(f"/api/requests/{running[0]['id']}").get_json()
    assert cancelled["cancelled"] is True
    rest = b"".join(chunks).decode()
    r.close()
    assert '"code": "request_cancelled"' in rest and rest.endswith("data: [DONE]\n\n"), rest[-300:]
    assert client.get("/api/requests").get_json()["data"] == []


def test_closing_a_stream_early_frees_its_sequences(client: FlaskClient) -> None:
    r, _ = _stream(client, 400)
    assert len(client.get("/api/requests").get_json()["data"]) == 1
    r.close()  # the client went away: the response's generator closes, cancelling its streams
    assert client.get("/api/requests").get_json()["data"] == []
