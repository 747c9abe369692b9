"""Settable context length and a chat template given at load (issue 26, items 2 and 3), on the real server.

IMPETUS_CONTEXT_LENGTH and ``POST /api/models/load``'s ``context_length`` / ``rope_scaling`` /
``chat_template`` / ``alias``: the effective length in /v1/models and /api/models, overflow a 400
``context_length_exceeded`` through the openai SDK (never a silent truncation), a length beyond the
trained one a 400 unless the load opts into the RoPE scaling the model declares, and on llama.cpp a
context beyond the old 4,096-token cap per slot, with the KV cache it reserves in the memory budget.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from tokenizers import Tokenizer

from tests.support import DEFAULT_MODEL
from tests.support.gguf import build_tiny_gguf
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama

pytestmark = pytest.mark.server

TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    default = default_model_folder()
    shutil.copytree(default, root / DEFAULT_MODEL)
    build_tiny_llama(root / "tiny", default, seed=1)  # trained for 512 tokens
    rope = build_tiny_llama(root / "tiny-rope", default, seed=2)
    config = json.loads((rope / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 4.0}  # declares 4 x 512
    (rope / "config.json").write_text(json.dumps(config))
    bare = build_tiny_llama(root / "tiny-bare", default, seed=3)
    tokenizer_config = json.loads((bare / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]  # a model that cannot chat until given a template
    (bare / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("context"), IMPETUS_MODELS_DIR=str(models_dir), IMPETUS_CONTEXT_LENGTH="4096"
    )
    yield server
    stop_server(server, wait=False)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0, timeout=120)


def load(srv: Server, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{srv.url}/api/models/load", json=body, timeout=300)


def loaded(srv: Server, body: dict[str, Any]) -> dict[str, Any]:
    r = load(srv, body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def listing(srv: Server) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in requests.get(f"{srv.url}/api/models", timeout=30).json()["data"]}


def refused(r: requests.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return str(error["message"])


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_the_server_default_bounds_every_model_and_the_listings_show_it(srv: Server, client: openai.OpenAI) -> None:
    # SmolLM2 was trained for 8192 tokens; IMPETUS_CONTEXT_LENGTH=4096 sets it, in both listings.
    assert client.models.retrieve(DEFAULT_MODEL).model_extra["context_length"] == 4096  # type: ignore[index]
    assert listing(srv)[DEFAULT_MODEL]["context_length"] == 4096
    # The tiny llama was trained for 512: the server default is clamped to it (Ollama's num_ctx rule).
    assert loaded(srv, {"model": "tiny"})["context_length"] == 512
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["tiny"]["context_length"] == 512  # type: ignore[index]


def test_a_smaller_context_refuses_what_the_trained_one_takes(srv: Server, client: openai.OpenAI) -> None:
    prompt = "hello " * 300  # ~320 tokens with the template: fits 512, not 128
    assert loaded(srv, {"model": "tiny"})["context_length"] == 512
    reply = client.chat.completions.create(model="tiny", messages=user(prompt), max_tokens=4)
    assert reply.usage is not None and 128 < reply.usage.prompt_tokens < 512

    # Other options than the resident's: the idle resident is reloaded with them (Ollama's rule).
    info = loaded(srv, {"model": "tiny", "context_length": 128})
    assert info["context_length"] == 128 and info["load_options"]["context_length"] == 128
    assert client.models.retrieve("tiny").model_extra["context_length"] == 128  # type: ignore[index]
    assert listing(srv)["tiny"]["context_length"] == 128
    for call in (
        lambda: client.chat.completions.create(model="tiny", messages=user(prompt), max_tokens=4),
        lambda: client.chat.completions.create(model="tiny", messages=user(prompt)),  # no max_tokens either
        lambda: client.completions.create(model="tiny", prompt=prompt, max_tokens=4),
    ):
        with pytest.raises(openai.BadRequestError) as info_:
            call()
        assert info_.value.body["code"] == "context_length_exceeded", info_.value.body  # type: ignore[index]
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=4).choices
    # A load with default options takes the resident as it is; back to the trained length only when asked.
    assert loaded(srv, {"model": "tiny"})["context_length"] == 128
    assert loaded(srv, {"model": "tiny", "context_length": 512})["context_length"] == 512


def test_a_context_beyond_the_trained_length_is_a_400(srv: Server) -> None:
    before = listing(srv)["tiny"]["context_length"]
    assert "512" in refused(load(srv, {"model": "tiny", "context_length": 513}), "context_length")
    assert "declares no RoPE scaling" in refused(load(srv, {"model": "tiny", "rope_scaling": True}), "rope_scaling")
    refused(load(srv, {"model": "tiny", "context_length": -1}), "context_length")
    refused(load(srv, {"model": "tiny", "context_length": "1024"}), "context_length")  # strict types
    assert "MLX folder" in refused(load(srv, {"model": "tiny", "backend": "llamacpp"}), "backend")
    assert listing(srv)["tiny"]["context_length"] == before  # a refused load leaves the resident alone


def test_rope_scaling_opt_in_extends_a_model_that_declares_it(srv: Server, client: openai.OpenAI) -> None:
    message = refused(load(srv, {"model": "tiny-rope", "context_length": 1024}), "context_length")
    assert "rope_scaling: true" in message and "2048" in message  # says how, and how far
    refused(load(srv, {"model": "tiny-rope", "context_length": 2049, "rope_scaling": True}), "context_length")
    info = loaded(srv, {"model": "tiny-rope", "context_length": 1024, "rope_scaling": True})
    assert info["context_length"] == 1024 and info["load_options"]["rope_scaling"] is True
    reply = client.chat.completions.create(model="tiny-rope", messages=user("hello " * 700), max_tokens=4)
    assert reply.usage is not None and 512 < reply.usage.prompt_tokens < 1024
    # Opting in without a length: the whole scaled context (other options: the idle resident is reloaded).
    assert loaded(srv, {"model": "tiny-rope", "rope_scaling": True})["context_length"] == 2048


def test_an_alias_is_a_resident_of_its_own(srv: Server, client: openai.OpenAI) -> None:
    loaded(srv, {"model": "tiny", "context_length": 512})
    info = loaded(srv, {"model": "tiny", "context_length": 64, "alias": "tiny-64"})
    assert (info["id"], info["context_length"], info["load_options"]["alias"]) == ("tiny-64", 64, "tiny-64")
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["tiny-64"]["context_length"] == 64 and cards["tiny"]["context_length"] == 512  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info_:
        client.completions.create(model="tiny-64", prompt="hello " * 100, max_tokens=4)
    assert info_.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert client.completions.create(model="tiny", prompt="hello " * 100, max_tokens=4).choices
    refused(load(srv, {"model": "tiny", "alias": "../escape"}), "alias")
    # The alias given to another model (an edited preset): the idle resident under it is replaced.
    other = loaded(srv, {"model": "tiny-rope", "alias": "tiny-64"})
    assert other["path"].endswith("tiny-rope") and other["context_length"] == 512


def test_a_chat_template_given_at_load_replaces_the_models(
    srv: Server, client: openai.OpenAI, models_dir: Path
) -> None:
    loaded(srv, {"model": "tiny-bare"})
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="tiny-bare", messages=user("hello world"), max_tokens=2)
    broken = refused(load(srv, {"model": "tiny-bare", "chat_template": "{% for m in messages %}"}), "chat_template")
    assert "does not compile" in broken
    refused(load(srv, {"model": "tiny-bare", "chat_template": "x" * (256 * 1024 + 1)}), "chat_template")

    info = loaded(srv, {"model": "tiny-bare", "chat_template": TEMPLATE})
    assert info["load_options"]["chat_template"] is True
    reply = client.chat.completions.create(model="tiny-bare", messages=user("hello world"), max_tokens=2)
    tokenizer = Tokenizer.from_file(str(models_dir / "tiny-bare" / "tokenizer.json"))
    expected = len(tokenizer.encode("<<hello world>>", add_special_tokens=False).ids)
    assert reply.usage is not None and reply.usage.prompt_tokens == expected  # our template's text, nothing else

    # A model that has a template of its own: the override replaces it (SmolLM2's adds a system turn).
    own = client.chat.completions.create(model="tiny", messages=user("hello world"), max_tokens=2)
    assert own.usage is not None and own.usage.prompt_tokens > expected + 10
    loaded(srv, {"model": "tiny", "chat_template": TEMPLATE, "alias": "tiny-plain"})
    plain = client.chat.completions.create(model="tiny-plain", messages=user("hello world"), max_tokens=2)
    assert plain.usage is not None and plain.usage.prompt_tokens == expected
    again = client.chat.completions.create(model="tiny", messages=user("hello world"), max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens == own.usage.prompt_tokens  # its own, untouched


# ---- llama.cpp: no 4,096-token cap per slot, and the memory budget counts the context
# A tiny random llama GGUF trained (says its header) for 8,192 tokens, like SmolLM2: what is tested is
# the slot's context and the KV cache it reserves, not the weights, and it prefills 4,300 tokens in a
# fraction of the second per thousand that the default model takes.

TINY_GGUF = "tiny-8k.gguf"


@pytest.fixture(scope="module")
def llama_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    models = tmp_path_factory.mktemp("llama-root") / "models"
    models.mkdir()
    build_tiny_gguf(models / TINY_GGUF, default_model_folder(), seed=4, context_length=8192)
    server = start_server(
        tmp_path_factory.mktemp("llamacpp-context"),
        wait_ready=False,
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_MAX_BATCH="2",
        IMPETUS_LLAMACPP_THREADS="1",
    )
    server.info["gguf"] = str(models / TINY_GGUF)
    yield server
    stop_server(server, wait=False)


def test_llama_cpp_serves_a_prompt_beyond_4096_tokens(llama_srv: Server) -> None:
    from gerdsen_ai_server.engine.backends.llamacpp_sizing import kv_bytes
    from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header

    client = openai.OpenAI(base_url=llama_srv.base_url, api_key="not-needed", max_retries=0, timeout=300)
    full = loaded(llama_srv, {"model": TINY_GGUF})
    assert full["format"] == "gguf" and full["context_length"] == 8192  # its trained length, not 4096
    assert client.models.retrieve(TINY_GGUF).model_extra["context_length"] == 8192  # type: ignore[index]
    reply = client.completions.create(model=TINY_GGUF, prompt="hello " * 4300, max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens > 4096 and reply.choices[0].finish_reason

    # A smaller context is a smaller KV cache: each of the 2 slots holds its whole context (f16 K and V).
    small = loaded(llama_srv, {"model": TINY_GGUF, "context_length": 1024, "alias": "tiny-1k"})
    meta = read_gguf_header(Path(llama_srv.info["gguf"])).metadata
    assert full["memory_bytes"] - small["memory_bytes"] == kv_bytes(meta, 2 * (8192 - 1024))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-1k", prompt="hello " * 1100, max_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert client.completions.create(model="tiny-1k", prompt="hello " * 900, max_tokens=2).choices
    refused(load(llama_srv, {"model": TINY_GGUF, "context_length": 8193, "alias": "tiny-big"}), "context_length")
