"""IMPETUS_BACKEND=auto picks the faster backend per model and machine (engine/backends/choice.py).

``decide`` for every kind of machine (pure: no server); then a real server under ``auto`` on this
one: on a CPU the embedded default model runs on llama.cpp, from an f16 GGUF of its weights, and
answers as on MLX ("Paris", which the shipped Q4_1 file on llama.cpp does not); /health and the
start-up line say which backend and why; an MLX folder stays on MLX; /v1/embeddings on the default
model is a 400 that says how to get them (the same model loaded on MLX under an alias), and that
way works. The rest of the suite runs the default model on MLX (tests/support/server.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from gerdsen_ai_server.engine.backends.choice import decide, mlx_device
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.server import Server, start_server, stop_server

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    ("setting", "device", "installed", "gpu", "default_model", "gguf"),
    [
        ("auto", "cpu", True, False, "llamacpp", "llamacpp"),  # Linux CPU: llama.cpp ~6x faster
        ("auto", "cpu", False, False, "mlx", "mlx"),  # no llama-cpp-python: everything converts
        ("auto", "metal", True, True, "mlx", "llamacpp"),  # Apple Silicon: the default stays on MLX
        ("auto", "cuda", True, False, "mlx", "mlx"),  # MLX's CUDA build beside a CPU-only llama.cpp
        ("auto", "cuda", True, True, "mlx", "llamacpp"),
        ("mlx", "cpu", True, False, "mlx", "mlx"),  # forced, whatever the machine
        ("llamacpp", "metal", True, True, "llamacpp", "llamacpp"),
    ],
)
def test_auto_decides_per_machine(
    setting: str, device: str, installed: bool, gpu: bool, default_model: str, gguf: str
) -> None:
    chosen = decide(setting, device, installed, gpu)  # type: ignore[arg-type]
    assert (chosen.default_model, chosen.gguf, chosen.mlx_device) == (default_model, gguf, device)
    assert chosen.reason and f"IMPETUS_BACKEND={setting}" in chosen.line()


ON_CPU = mlx_device() == "cpu"


@pytest.fixture(scope="module")
def tiny_mlx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors folder (random weights): only MLX can run it."""
    from gerdsen_ai_server.engine.formats.gguf import ensure_default_model
    from tests.support.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("user") / "tiny", ensure_default_model(TEST_MODELS_DIR))


@pytest.fixture(scope="module")
def auto(tmp_path_factory: pytest.TempPathFactory, tiny_mlx: Path) -> Iterator[Server]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    srv = start_server(
        tmp_path_factory.mktemp("auto"),
        IMPETUS_BACKEND="auto",
        IMPETUS_LLAMACPP_THREADS="1",  # one thread: two spin-wait on a busy 2-core machine
        IMPETUS_MODEL_PATHS=str(tiny_mlx),
    )
    yield srv
    stop_server(srv, wait=False)


def residents(srv: Server) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in requests.get(srv.url + "/health", timeout=10).json()["models"]}


@pytest.mark.server
@pytest.mark.slow
def test_auto_serves_the_default_model_on_the_faster_backend(auto: Server) -> None:
    backend = requests.get(auto.url + "/health", timeout=10).json()["backend"]
    want = "llamacpp" if ON_CPU else "mlx"
    assert backend["setting"] == "auto" and backend["mlx_device"] == mlx_device()
    assert backend["default_model"] == want and backend["reason"]
    default = residents(auto)[DEFAULT_MODEL]
    assert default["backend"] == want
    if ON_CPU:
        assert str(default["path"]).endswith(f"{DEFAULT_MODEL}-f16.gguf")  # not the Q4_1 file: MLX's answers
        assert "MLX computes on the CPU here" in backend["reason"]
    # The start-up line (impetus serve, before Gunicorn) and the worker's "ready" line say it too.
    assert f"backend (IMPETUS_BACKEND=auto): the default model on {want}" in auto.log()
    assert f"model {DEFAULT_MODEL} ready on {want}" in auto.log()

    client = openai.OpenAI(base_url=auto.base_url, api_key="x", max_retries=0, timeout=120)
    assert DEFAULT_MODEL in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=12, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or ""), reply  # the f16 weights answer as MLX does
    info = requests.get(auto.url + f"/api/models/{DEFAULT_MODEL}", timeout=10).json()
    assert info["format"] == ("gguf" if ON_CPU else "mlx")
    # The dashboard's warm-up and benchmark run on it as on MLX.
    r = requests.post(auto.url + "/api/models/load", json={"model": DEFAULT_MODEL, "warmup": True}, timeout=300)
    assert r.status_code == 200, r.text
    r = requests.post(
        auto.url + f"/api/models/{DEFAULT_MODEL}/benchmark", json={"prompt_tokens": 16, "max_tokens": 8}, timeout=300
    )
    assert r.status_code == 200 and r.json()["model"] == DEFAULT_MODEL, r.text


@pytest.mark.server
@pytest.mark.slow
def test_embeddings_of_the_default_model_on_llama_cpp_say_how_and_that_way_works(auto: Server) -> None:
    if not ON_CPU:
        pytest.skip("the default model runs on MLX here, which embeds it")
    r = requests.post(auto.url + "/v1/embeddings", json={"model": DEFAULT_MODEL, "input": "hello"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert '"backend": "mlx"' in r.json()["error"]["message"]
    load = {"model": DEFAULT_MODEL, "backend": "mlx", "alias": "smollm2-mlx"}  # what the message says
    r = requests.post(auto.url + "/api/models/load", json=load, timeout=300)
    assert r.status_code == 200, r.text
    try:
        assert residents(auto)["smollm2-mlx"]["backend"] == "mlx"
        r = requests.post(auto.url + "/v1/embeddings", json={"model": "smollm2-mlx", "input": "hello"}, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 576  # SmolLM2-135M's hidden size
    finally:
        requests.post(auto.url + "/api/models/unload", json={"model": "smollm2-mlx"}, timeout=60)


@pytest.mark.server
@pytest.mark.slow
def test_an_mlx_folder_stays_on_mlx_under_auto(auto: Server, tiny_mlx: Path) -> None:
    r = requests.post(auto.url + "/api/models/load", json={"model": str(tiny_mlx)}, timeout=300)
    assert r.status_code == 200, r.text
    model_id = r.json()["id"]
    try:
        assert residents(auto)[model_id]["backend"] == "mlx"
        client = openai.OpenAI(base_url=auto.base_url, api_key="x", max_retries=0, timeout=120)
        out = client.completions.create(model=model_id, prompt="Hello", max_tokens=4, temperature=0)
        assert out.usage is not None and out.usage.completion_tokens >= 1
    finally:
        requests.post(auto.url + "/api/models/unload", json={"model": model_id}, timeout=60)


@pytest.mark.server
def test_the_suite_runs_the_default_model_on_mlx(server: Server) -> None:
    """tests/support/server.py's default (IMPETUS_BACKEND=mlx): the rest of tests/api tests MLX."""
    backend = requests.get(server.url + "/health", timeout=10).json()["backend"]
    assert backend["setting"] == "mlx" and backend["default_model"] == "mlx"
    assert residents(server)[DEFAULT_MODEL]["backend"] == "mlx"
