"""Issue 23, items 1 and 2 through the real server: a request's ``model`` names only models in the models
dir (or IMPETUS_MODEL_PATHS), every other spec gets one uniform 404 that names no host path, and a
GGUF named like a model folder converts without touching that folder.

Reproduce the old behaviour: ``curl -d '{"model": "/etc/passwd"}' localhost:8080/api/models/load`` answered
422 "/etc/passwd: unknown model file type" and ``/etc/no-such-file`` 404: a file-existence oracle."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests
import socketio

from gerdsen_ai_server.store.default_model import default_gguf_path
from gerdsen_ai_server.store.paths import model_not_found
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama
from tests.unit.test_model_confinement import snapshot

pytestmark = pytest.mark.server

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/models (the models dir) and root/outside, beside it."""
    root = tmp_path_factory.mktemp("safe-paths")
    models, outside = root / "models", root / "outside"
    default = default_model_folder()
    build_tiny_llama(models / "tiny", default, seed=1)
    shutil.copyfile(default_gguf_path(), models / "tiny.gguf")  # a GGUF named like the model folder beside it
    shutil.copyfile(default_gguf_path(), models / "..gguf")  # its stem is "."
    (models / "exported-onnx").mkdir()
    (models / "exported-onnx" / "model.onnx").write_bytes(b"\x08\x07")
    build_tiny_llama(outside / "secret-tiny", default, seed=2)
    build_tiny_llama(outside / "allowed-tiny", default, seed=3)
    (models / "escape").symlink_to(outside / "secret-tiny")  # an entry of the models dir that leads out of it
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Iterator[Server]:
    # The default model is an operator path outside the models dir: it still loads (trusted).
    server = start_server(
        tmp_path_factory.mktemp("safe-paths-server"),
        IMPETUS_MODELS_DIR=str(tree / "models"),
        IMPETUS_DEFAULT_MODEL=str(TEST_MODELS_DIR / DEFAULT_MODEL),
        IMPETUS_BACKEND="mlx",
        IMPETUS_MODEL_PATHS=str(tree / "outside" / "allowed-tiny"),
    )
    yield server
    stop_server(server, wait=False)


def refused_specs(tree: Path) -> list[str]:
    outside = tree / "outside"
    return [
        "/etc/passwd",
        "/etc/no-such-file",
        "~/x",
        "~root/.bashrc",
        "../outside/secret-tiny",
        "../x",
        str(outside / "secret-tiny"),
        str(tree / "models" / "tiny"),
        "escape",
        "a\\b",
        "..\\outside\\secret-tiny",
        "no-such-model",
        ".impetus",
        "..gguf",
        f"{outside / 'allowed-tiny'}/../secret-tiny",
    ]


def user_entries(models: Path) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in snapshot(models).items() if not k.startswith(".impetus")}


def assert_uniform(spec: str, message: str, text: str, tree: Path) -> None:
    """The one refusal (store.paths.model_not_found), echoing the spec as sent and no path of the host."""
    assert message == str(model_not_found(spec)), (spec, message)
    # The echo is the spec, or its first 77 characters when longer than 80 (a spec under a long temp dir:
    # an xdist worker's, macOS's /var/folders/...), plain or with JSON's escaped slashes.
    for echo in (spec, spec[:77]):
        text = text.replace(echo, "").replace(echo.replace("/", "\\/"), "")
    assert str(tree) not in text
    assert str(Path.home()) not in text


def test_every_route_refuses_specs_outside_the_models_dir_alike(srv: Server, tree: Path) -> None:
    before = user_entries(tree / "models")
    oai = openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=srv.url, api_key="not-needed", max_retries=0, timeout=60)
    sio = socketio.Client(reconnection=False)
    sio.connect(srv.url, transports=["websocket"], wait_timeout=30)
    try:
        for spec in refused_specs(tree):
            r = requests.post(f"{srv.url}/api/models/load", json={"model": spec}, timeout=60)
            assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (
                404,
                "model_not_found",
                "model",
            ), (spec, r.text)
            assert_uniform(spec, r.json()["error"]["message"], r.text, tree)

            with pytest.raises(openai.NotFoundError) as oai_info:
                oai.chat.completions.create(model=spec, messages=HI, max_tokens=2)  # type: ignore[arg-type]
            assert oai_info.value.code == "model_not_found"
            assert_uniform(spec, oai_info.value.body["message"], oai_info.value.response.text, tree)  # type: ignore[index]

            with pytest.raises(anthropic.NotFoundError) as claude_info:
                claude.messages.create(model=spec, max_tokens=2, messages=HI)  # type: ignore[arg-type]
            assert_uniform(
                spec,
                claude_info.value.body["error"]["message"],  # type: ignore[index]
                claude_info.value.response.text,
                tree,
            )

            ack: dict[str, Any] = sio.call("generate", {"model": spec, "messages": HI, "max_tokens": 2}, timeout=60)
            assert ack["error"]["code"] == "model_not_found", ack
            assert_uniform(spec, ack["error"]["message"], str(ack), tree)
    finally:
        sio.disconnect()
    for spec in ("/etc/passwd", "escape", "~/x"):  # the other routes that name a model load it the same way
        for path, body in (
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
            ("/v1/embeddings", {"input": "hi"}),
            ("/v1/responses", {"input": "hi"}),
            ("/v1/messages/count_tokens", {"messages": HI}),
        ):
            r = requests.post(srv.url + path, json={"model": spec, **body}, timeout=60)
            assert r.status_code == 404, (path, spec, r.text)
            message = r.json()["error"]["message"]
            assert_uniform(spec, message, r.text, tree)
    assert user_entries(tree / "models") == before
    assert "links outside the models dir" in srv.log() or "resolves outside the models dir" in srv.log()


def test_model_paths_allows_a_listed_outside_folder(srv: Server, tree: Path) -> None:
    allowed = str(tree / "outside" / "allowed-tiny")
    r = requests.post(f"{srv.url}/api/models/load", json={"model": allowed}, timeout=120)
    assert r.status_code == 200 and r.json()["id"] == "allowed-tiny", r.text
    try:
        r = requests.post(
            f"{srv.base_url}/chat/completions",
            timeout=120,
            json={"model": "allowed-tiny", "messages": HI, "max_tokens": 2},
        )
        assert r.status_code == 200 and r.json()["model"] == "allowed-tiny", r.text
    finally:
        requests.post(f"{srv.url}/api/models/unload", json={"model": "allowed-tiny"}, timeout=60)


def test_a_gguf_named_like_a_model_folder_converts_beside_it(srv: Server, tree: Path) -> None:
    models = tree / "models"
    before = user_entries(models)
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny.gguf"}, timeout=300)
    assert r.status_code == 200 and r.json()["id"] == "tiny.gguf", r.text
    try:
        assert user_entries(models) == before  # the folder "tiny" is as it was
        converted = [p.name for p in (models / ".impetus" / "converted").iterdir() if not p.name.startswith(".")]
        assert len(converted) == 1 and converted[0].startswith("tiny-"), converted
        assert "tiny.gguf" in [m["id"] for m in requests.get(f"{srv.base_url}/models", timeout=30).json()["data"]]
        r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny"}, timeout=120)
        assert r.status_code == 200 and r.json()["context_length"] == 512  # still the tiny llama, not SmolLM2
    finally:
        for model in ("tiny.gguf", "tiny"):
            requests.post(f"{srv.url}/api/models/unload", json={"model": model}, timeout=60)


def test_errors_and_listing_name_no_host_path(srv: Server, tree: Path) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "exported-onnx"}, timeout=120)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "unsupported_model_format"), r.text
    assert "<models_dir>/exported-onnx is a ONNX model" in r.json()["error"]["message"] and str(tree) not in r.text
    assert str(tree / "models" / "exported-onnx") in srv.log()  # the operator still sees where
    listing = {m["id"]: m for m in requests.get(f"{srv.url}/api/models", timeout=30).json()["data"]}
    assert "IMPETUS_MODEL_PATHS" in listing["escape"]["error"]  # said in the list, not only as a 404 on load
    assert listing[DEFAULT_MODEL]["state"] == "resident"  # the operator's path outside the models dir loaded
    r = requests.post(f"{srv.url}/api/models/unload", json={"model": "~no-such-user/x"}, timeout=30)
    assert r.status_code == 404, r.text  # not a 500 from expanding "~no-such-user"
