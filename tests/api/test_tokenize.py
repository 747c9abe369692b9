"""/tokenize, /detokenize (vLLM's shapes) and /apply-template (llama-server's) on the real server.

On the session server (the default model on MLX) the answers are checked against Hugging Face's own
tokenizer and chat template, and against what a chat completion counts as its prompt. A second
server runs the default model on llama.cpp beside a tiny BERT embedding model, with API keys: the
same messages give the same ids on both backends, the embedding model tokenizes (its [CLS]/[SEP] only
with ``add_special_tokens``), and the root paths need the key as /v1 does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
KEY = "sk-tokenize-test-0123456789abcdef"
EMBEDDER = "tiny-tokenize-bert"


@pytest.fixture(scope="module")
def hf():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_folder())


def post(server: Server, path: str, body: dict[str, Any], key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.url + path, json=body, headers=headers, timeout=120)


def ok(server: Server, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    reply = post(server, path, body, key)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def refused(server: Server, path: str, body: dict[str, Any], status: int = 400) -> dict[str, Any]:
    reply = post(server, path, body)
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    return error


def test_prompt_is_tokenized_as_the_models_tokenizer_does(server, hf) -> None:  # type: ignore[no-untyped-def]
    text = "Tokenizers split text into pieces: ünïcode, 1234 and  spaces."
    out = ok(server, "/tokenize", {"model": DEFAULT_MODEL, "prompt": text, "return_token_strs": True})
    assert out["tokens"] == hf.encode(text) and out["count"] == len(out["tokens"])
    assert out["token_strs"] == hf.convert_ids_to_tokens(out["tokens"])
    card = requests.get(f"{server.base_url}/models/{DEFAULT_MODEL}", timeout=30).json()
    assert out["max_model_len"] == card["context_length"] > 0
    assert ok(server, "/tokenize", {"model": DEFAULT_MODEL, "prompt": text})["token_strs"] is None
    # and back (vLLM's /detokenize): the text again
    assert ok(server, "/detokenize", {"model": DEFAULT_MODEL, "tokens": out["tokens"]}) == {"prompt": text}


def test_messages_give_the_chat_completions_prompt(server, client, hf) -> None:  # type: ignore[no-untyped-def]
    """One rendering path (serving/chat.py chat_text): /tokenize's count is the chat completion's
    prompt_tokens, with tools too, and its ids are Hugging Face's apply_chat_template."""
    out = ok(server, "/tokenize", {"model": DEFAULT_MODEL, "messages": MESSAGES})
    rendered = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert out["tokens"] == hf.encode(rendered, add_special_tokens=False)
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=1)
    assert out["count"] == chat.usage.prompt_tokens
    with_tools = ok(server, "/tokenize", {"model": DEFAULT_MODEL, "messages": MESSAGES, "tools": [WEATHER]})
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=1)
    assert with_tools["count"] == chat.usage.prompt_tokens > out["count"]


def test_apply_template_is_the_templates_text(server, hf) -> None:  # type: ignore[no-untyped-def]
    """llama-server's /apply-template: the text, not ids; no model named is the default model."""
    text = ok(server, "/apply-template", {"messages": MESSAGES})["prompt"]
    assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    closed = ok(
        server, "/apply-template", {"model": DEFAULT_MODEL, "messages": MESSAGES, "add_generation_prompt": False}
    )
    assert closed["prompt"] == text.removesuffix("<|im_start|>assistant\n")
    prefilled = [*MESSAGES, {"role": "assistant", "content": "The capital is"}]
    cont = ok(
        server,
        "/apply-template",
        {"messages": prefilled, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert cont["prompt"].endswith("The capital is")
    ids = ok(server, "/tokenize", {"messages": MESSAGES})["tokens"]  # tokenize without a model too
    assert ok(server, "/detokenize", {"tokens": ids})["prompt"] == text


def test_bad_requests_are_400s_naming_the_field(server) -> None:  # type: ignore[no-untyped-def]
    both = refused(server, "/tokenize", {"model": DEFAULT_MODEL, "prompt": "hi", "messages": MESSAGES})
    assert both["param"] == "messages"
    assert refused(server, "/tokenize", {"model": DEFAULT_MODEL})["param"] == "prompt"
    for name, value in (("add_generation_prompt", False), ("tools", [WEATHER]), ("chat_template_kwargs", {"a": 1})):
        error = refused(server, "/tokenize", {"model": DEFAULT_MODEL, "prompt": "hi", name: value})
        assert error["param"] == name, error
    unknown = refused(server, "/tokenize", {"model": DEFAULT_MODEL, "prompt": "hi", "chat_template": "{{x}}"})
    assert unknown["code"] == "unknown_parameter" and unknown["param"] == "chat_template"
    for tokens in ([0, 10**8], [-1]):
        error = refused(server, "/detokenize", {"model": DEFAULT_MODEL, "tokens": tokens})
        assert error["param"] == "tokens" and error["code"] == "invalid_value", error
    assert refused(server, "/detokenize", {"model": DEFAULT_MODEL, "tokens": [0] * 262145})["param"] == "tokens"
    assert refused(server, "/detokenize", {"model": DEFAULT_MODEL, "tokens": ["1"]})["param"].startswith("tokens")
    huge = refused(server, "/tokenize", {"model": DEFAULT_MODEL, "prompt": "x" * 3_000_000})
    assert huge["code"] == "context_length_exceeded" and huge["param"] == "prompt"
    assert refused(server, "/tokenize", {"model": "no-such-model", "prompt": "hi"}, 404)["code"] == "model_not_found"
    both_ways = {"messages": MESSAGES, "continue_final_message": True}
    assert refused(server, "/apply-template", both_ways)["message"].find("continue_final_message") >= 0
    assert refused(server, "/apply-template", {"model": DEFAULT_MODEL})["param"] == "messages"


def test_root_paths_only_as_vllm(server) -> None:  # type: ignore[no-untyped-def]
    """vLLM serves them at the root, not under /v1; so does this server."""
    reply = requests.post(server.base_url + "/tokenize", json={"model": DEFAULT_MODEL, "prompt": "hi"}, timeout=30)
    assert reply.status_code == 404
    reply = requests.get(server.url + "/tokenize", timeout=30)
    assert reply.status_code == 405


def test_root_paths_take_json_only(server) -> None:  # type: ignore[no-untyped-def]
    """As /v1 (web/request_checks.py): a page's text/plain post, which needs no preflight, is a 415."""
    body = '{"prompt": "hi"}'
    for path in ("/tokenize", "/detokenize", "/apply-template"):
        reply = requests.post(server.url + path, data=body, headers={"Content-Type": "text/plain"}, timeout=30)
        assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type", path


def test_every_route_is_in_the_openapi_document(server) -> None:  # type: ignore[no-untyped-def]
    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    for path in ("/tokenize", "/detokenize", "/apply-template"):
        assert paths[path]["post"]["security"] == [{"bearerAuth": []}], path
        assert "requestBody" in paths[path]["post"]


# ---- the llama.cpp backend, an embedding model, API keys -----------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    from tests.support.tiny_models import build_tiny_bert

    models = tmp_path_factory.mktemp("tokenize-models")
    build_tiny_bert(models / EMBEDDER)
    srv = start_server(
        tmp_path_factory.mktemp("tokenize-server"),
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_API_KEYS=KEY,
        IMPETUS_LLAMACPP_THREADS="1",
    )
    yield srv
    stop_server(srv, wait=False)


def test_llamacpp_tokenizes_as_mlx(server, llama) -> None:  # type: ignore[no-untyped-def]
    model = requests.get(llama.base_url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    backends = {m["id"] for m in model.json()["data"]}
    assert DEFAULT_MODEL in backends
    for body in ({"prompt": "Paris is lovely in spring."}, {"messages": MESSAGES, "tools": [WEATHER]}):
        mlx = ok(server, "/tokenize", {"model": DEFAULT_MODEL, **body})
        cpp = ok(llama, "/tokenize", {"model": DEFAULT_MODEL, **body}, KEY)
        assert cpp["tokens"] == mlx["tokens"], body
    text = ok(llama, "/apply-template", {"messages": MESSAGES}, KEY)["prompt"]
    assert text == ok(server, "/apply-template", {"messages": MESSAGES})["prompt"]
    ids = ok(llama, "/tokenize", {"messages": MESSAGES}, KEY)["tokens"]
    assert ok(llama, "/detokenize", {"tokens": ids}, KEY)["prompt"] == text


def test_an_embedding_model_tokenizes(llama) -> None:  # type: ignore[no-untyped-def]
    """Its [CLS] ... [SEP] with add_special_tokens (the default for a prompt), not without; no
    chat template, so messages are a 400; max_model_len is its input limit."""
    with_special = ok(llama, "/tokenize", {"model": EMBEDDER, "prompt": "hello world", "return_token_strs": True}, KEY)
    bare = ok(llama, "/tokenize", {"model": EMBEDDER, "prompt": "hello world", "add_special_tokens": False}, KEY)
    assert with_special["token_strs"][0] == "[CLS]" and with_special["token_strs"][-1] == "[SEP]"
    assert with_special["tokens"][1:-1] == bare["tokens"] and bare["count"] == len(bare["tokens"]) > 0
    assert with_special["max_model_len"] == 64  # build_tiny_bert's max_positions
    reply = post(llama, "/tokenize", {"model": EMBEDDER, "messages": MESSAGES}, KEY)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "model_not_supported", reply.text
    assert ok(llama, "/detokenize", {"model": EMBEDDER, "tokens": bare["tokens"]}, KEY)["prompt"] == "hello world"


def test_root_paths_need_the_key(llama) -> None:  # type: ignore[no-untyped-def]
    """web/keys.py needs_key covers every path that is not a probe or the docs: these too."""
    for path, body in (
        ("/tokenize", {"prompt": "hi"}),
        ("/detokenize", {"tokens": [1]}),
        ("/apply-template", {"messages": MESSAGES}),
    ):
        for key in (None, "sk-wrong-key-0123456789abcdef"):
            reply = post(llama, path, body, key)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", (path, reply.text)
        assert post(llama, path, body, KEY).status_code == 200, path
