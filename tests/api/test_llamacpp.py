"""The llama.cpp backend (engine/backends/llamacpp.py) against the real Gunicorn server.

The embedded default model's weights (SmolLM2-135M), dequantized as the MLX engine computes them,
are written as an f32 GGUF (bench/gguf_model.py) into a folder named like the default model, and
served with ``IMPETUS_BACKEND=llamacpp``: the model keeps its id, so the whole OpenAI conformance
module (tests/api/test_openai.py) runs here again, unchanged, against llama.cpp. (The wheel's own
Q4_1 file runs too, but llama.cpp's Q4_1 kernels round activations to 8 bits, and this small
model's greedy answer to the capital question changes.) Then what is this
backend's own: continuous batching (greedy alone == greedy beside 7 sampled others, with several
sequences in one step), cancellation on disconnect, prompt-prefix reuse, and routing: in ``auto``
mode a user's ``.gguf`` loads on llama.cpp beside the default model (on llama.cpp too on a CPU, on
MLX on a GPU: tests/api/test_backend_choice.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")

from tests.api import test_openai  # noqa: E402
from tests.api.test_openai import *  # noqa: E402,F401,F403  # every conformance test, on llama.cpp
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR  # noqa: E402
from tests.support.server import Server, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.server


def f32_gguf() -> Path:
    """The default model as an f32 GGUF in a folder of its own id (built once, ~540 MB, cached)."""
    from tests.support.gguf import default_f32_gguf

    return default_f32_gguf()


# One llama.cpp thread: on a shared 2-core machine, two spinning threads stall whenever a core is busy.
ENV = {"IMPETUS_BACKEND": "llamacpp", "IMPETUS_MAX_BATCH": "8", "IMPETUS_LLAMACPP_THREADS": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("llamacpp"), IMPETUS_DEFAULT_MODEL=str(f32_gguf().parent), **ENV)
    yield srv
    stop_server(srv, wait=False)


@pytest.fixture(scope="module")
def client(server: Server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from gerdsen_ai_server.engine.formats.gguf import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model(TEST_MODELS_DIR))


def metric(server: Server, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def active_sequences_while(server: Server, threads: list[threading.Thread]) -> list[float]:
    """Starts the threads and waits for them (2 minutes at most each), sampling the server's
    impetus_active_sequences every 0.05 s meanwhile; returns the samples."""
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(metric(server, "impetus_active_sequences"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    return seen


def test_the_default_model_runs_on_llama_cpp(server: Server) -> None:
    health = requests.get(server.url + "/health", timeout=10).json()
    (model,) = [m for m in health["models"] if m["id"] == DEFAULT_MODEL]
    assert model["path"].endswith(".gguf")  # not the converted MLX folder
    assert model["context_length"] == 8192  # its trained length: no longer capped at 4,096 per slot


def test_embeddings(client) -> None:  # type: ignore[no-untyped-def]  # replaces the MLX module's
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=DEFAULT_MODEL, input="x")
    assert info.value.status_code == 400 and info.value.body["param"] == "model"
    assert "llama.cpp" in info.value.body["message"]


STORY = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
OTHERS = [
    "Name three fruits.",
    "What is 2 + 2?",
    "Describe the sea.",
    "Write a haiku about snow.",
    "List some colours.",
    "Why is the sky blue?",
    "Say hello in French.",
]


def test_greedy_alone_equals_greedy_beside_seven_others(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    def greedy() -> str:
        return (
            client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=48, temperature=0)
            .choices[0]
            .message.content
        )

    alone = greedy()
    results: dict[str, str] = {}

    def other(i: int) -> None:
        results[f"o{i}"] = (
            client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": OTHERS[i]}],
                max_tokens=64,
                temperature=0.9,
                seed=i,
            )
            .choices[0]
            .message.content
        )

    def target() -> None:
        time.sleep(0.3)  # join a batch already running
        results["greedy"] = greedy()

    threads = [threading.Thread(target=other, args=(i,)) for i in range(7)] + [threading.Thread(target=target)]
    seen = active_sequences_while(server, threads)
    assert results["greedy"] == alone
    assert len(results) == 8
    assert max(seen) >= 4  # decoded together, not one request after another


def test_seeded_sampling_does_not_depend_on_the_batch(client) -> None:  # type: ignore[no-untyped-def]
    def sample() -> str:
        return (
            client.completions.create(
                model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0, seed=1234
            )
            .choices[0]
            .text
        )

    alone = sample()
    out: list[str] = []
    noise = [
        threading.Thread(
            target=lambda: client.completions.create(
                model=DEFAULT_MODEL, prompt="The weather today", max_tokens=40, temperature=1.0
            )
        )
        for _ in range(3)
    ]
    for t in noise:
        t.start()
    out.append(sample())
    for t in noise:
        t.join(120)
    assert out == [alone]


def test_a_repeated_seeded_request_reads_the_same_logprobs(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    # The repeat finds the prompt cached and feeds only its end. Fed as a one-token chunk, the end
    # came out of llama.cpp's CPU products a few 1e-3 off, and at temperature 1 the answer changed.
    def sample() -> tuple[str, list[float]]:
        choice = client.completions.create(
            model=DEFAULT_MODEL, prompt="A dragon and a knight met", max_tokens=16, temperature=1.0, seed=3, logprobs=1
        ).choices[0]
        return choice.text, choice.logprobs.token_logprobs

    first = sample()
    hits = metric(server, "impetus_prompt_cache_hits_total")
    assert sample() == first
    assert metric(server, "impetus_prompt_cache_hits_total") == hits + 1


def test_a_closed_stream_frees_its_sequence(client, server: Server, tokenizer) -> None:  # type: ignore[no-untyped-def]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    before = metric(server, 'impetus_engine_requests_total{outcome="cancelled"}')
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=STORY, max_tokens=3000, stream=True, logit_bias={str(eos): -100}
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(server, "impetus_requests_in_flight") > 0:
        time.sleep(0.1)
    assert metric(server, "impetus_requests_in_flight") == 0
    assert metric(server, "impetus_active_sequences") == 0
    assert metric(server, 'impetus_engine_requests_total{outcome="cancelled"}') == before + 1


def test_a_repeated_prompt_reuses_its_prefix(client, server: Server) -> None:  # type: ignore[no-untyped-def]
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    ask = [system, {"role": "user", "content": "What is the capital of Italy?"}]
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=ask, max_tokens=8, temperature=0)
    hits = metric(server, "impetus_prompt_cache_hits_total")
    again = [system, {"role": "user", "content": "What is the capital of Spain?"}]
    second = client.chat.completions.create(model=DEFAULT_MODEL, messages=again, max_tokens=8, temperature=0)
    assert metric(server, "impetus_prompt_cache_hits_total") == hits + 1
    assert first.usage.prompt_tokens > 200 and second.usage.prompt_tokens > 200


def test_auto_mode_runs_user_gguf_on_llama_cpp_beside_the_default_model(tmp_path: Path) -> None:
    from gerdsen_ai_server.engine.backends.choice import choose

    default_backend = choose("auto").default_model  # llamacpp on a CPU (an f16 GGUF), mlx on a GPU
    user = tmp_path / "models"
    user.mkdir()
    (user / "mine.gguf").symlink_to(f32_gguf())
    # A request may name a file outside the models dir only when the operator lists it (issue 23).
    srv = start_server(
        tmp_path, IMPETUS_BACKEND="auto", IMPETUS_LLAMACPP_THREADS="1", IMPETUS_MODEL_PATHS=str(user / "mine.gguf")
    )
    try:
        r = requests.post(srv.url + "/api/models/load", json={"model": str(user / "mine.gguf")}, timeout=300)
        assert r.status_code == 200, r.text
        paths = {m["id"]: m["path"] for m in requests.get(srv.url + "/health", timeout=10).json()["models"]}
        assert paths[DEFAULT_MODEL].endswith(
            f"{DEFAULT_MODEL}-f16.gguf" if default_backend == "llamacpp" else DEFAULT_MODEL
        )
        assert paths["mine.gguf"].endswith(".gguf")
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        answers = [
            client.chat.completions.create(model=m, messages=test_openai.CAPITAL, max_tokens=12, temperature=0)
            .choices[0]
            .message.content
            for m in (DEFAULT_MODEL, "mine.gguf")
        ]
        assert all("Paris" in a for a in answers), answers
        info = requests.get(srv.url + "/api/models/mine.gguf", timeout=10).json()
        assert info["memory_bytes"] > f32_gguf().stat().st_size  # the weights plus the KV cache of 8 slots
        assert info["format"] == "gguf"  # the backend's real format (every resident model said "mlx" once)
        default = requests.get(srv.url + f"/api/models/{DEFAULT_MODEL}", timeout=10).json()
        assert default["format"] == ("gguf" if default_backend == "llamacpp" else "mlx")  # choice.py
        r = requests.post(srv.url + "/api/models/unload", json={"model": "mine.gguf"}, timeout=60)
        assert r.status_code == 200, r.text
        ids = [m["id"] for m in requests.get(srv.url + "/health", timeout=10).json()["models"]]
        assert ids == [DEFAULT_MODEL]
    finally:
        stop_server(srv, wait=False)


def test_a_hot_machine_caps_the_llama_cpp_batch(tmp_path: Path) -> None:
    srv = start_server(
        tmp_path,
        IMPETUS_DEFAULT_MODEL=str(f32_gguf().parent),
        IMPETUS_FAULT_THERMAL_STATE="serious",
        IMPETUS_THERMAL_BATCH_SIZE="2",
        IMPETUS_THERMAL_INTERVAL="0.5",
        **ENV,
    )
    try:
        deadline = time.monotonic() + 30
        while requests.get(srv.url + "/health", timeout=10).json()["batch_limit"] != 2:
            assert time.monotonic() < deadline, "the thermal cap never came"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)

        def ask(i: int) -> None:
            client.completions.create(model=DEFAULT_MODEL, prompt=f"Count to {i + 5}:", max_tokens=32, temperature=0)

        seen = active_sequences_while(srv, [threading.Thread(target=ask, args=(i,)) for i in range(4)])
        assert max(seen) == 2  # 4 requests, never more than 2 decoding at once
        assert metric(srv, "impetus_requests_in_flight") == 0
    finally:
        stop_server(srv, wait=False)
