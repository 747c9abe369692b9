"""A quantized KV cache (issue 27, item 2) on a real Gunicorn server, with the `openai` SDK.

The default model's GGUF on llama.cpp (IMPETUS_BACKEND=llamacpp, 8 slots of 2,048 tokens) is
resident with its f16 cache; the same model is loaded again under aliases with ``kv_bits`` 8 (q8_0)
and 4 (q4_0), and by a preset. Each answers; /api/models shows each one's memory smaller by exactly
the KV bytes the quantization saves (what llama.cpp allocates: 23,040 bytes a token at f16, 12,240
at q8_0, 6,480 at q4_0 for this model); greedy answers agree with the f16 cache's as far as measured
(docs/llamacpp.md); a seeded request repeats; the prompt prefix is reused; eight streams run in one
batch. An MLX model whose cache cannot be quantized refuses ``kv_bits`` with a 400 naming it, as does
a value other than 0, 4 or 8 (MLX's quantized cache: tests/api/test_kv_quant_mlx.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")

from gerdsen_ai_server.config import Settings  # noqa: E402
from gerdsen_ai_server.engine.options import EngineOptions, LoadOptions  # noqa: E402
from tests.support import DEFAULT_MODEL  # noqa: E402
from tests.support.models import default_model_folder  # noqa: E402
from tests.support.server import Server, start_server, stop_server  # noqa: E402
from tests.support.tiny_models import build_tiny_llama  # noqa: E402

pytestmark = pytest.mark.server

SLOTS, CONTEXT = 8, 2048
KV_PER_TOKEN = {0: 23040, 8: 12240, 4: 6480}  # 2 x 30 layers x 3 KV heads x 64: f16 2 B, q8_0 34/32, q4_0 18/32
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# On ASK the greedy answer ("The capital of France is Paris.") is the f16 cache's at 8 and 4 bits, the
# chosen tokens' log-probabilities a mean 0.006 (8) and 0.10 (4) apart (measured; bench/kv_quant.py
# has the figures over more prompts, where answers do part): bounds a few times those.
MEAN_LOGPROB_DIFF = {8: 0.03, 4: 0.3}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kv-models")
    build_tiny_llama(root / "tiny", default_model_folder(), seed=1)  # an MLX folder: always on MLX
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("kv-server"),
        IMPETUS_MODELS_DIR=str(models),
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_MAX_BATCH=str(SLOTS),
        IMPETUS_CONTEXT_LENGTH=str(CONTEXT),
        IMPETUS_LLAMACPP_THREADS="1",  # a shared 2-core machine: see tests/api/test_llamacpp.py
    )
    for alias, bits in (("kv8", 8), ("kv4", 4)):
        r = load(srv, alias=alias, kv_bits=bits)
        assert r.status_code == 200, r.text
    yield srv
    stop_server(srv, wait=False)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


def load(server: Server, **body: Any) -> requests.Response:
    return requests.post(server.url + "/api/models/load", json={"model": DEFAULT_MODEL, **body}, timeout=300)


def residents(server: Server) -> dict[str, dict[str, Any]]:
    data = requests.get(server.url + "/api/models", timeout=30).json()["data"]
    return {m["id"]: m for m in data if m["state"] == "resident"}


def greedy(client: openai.OpenAI, model: str, max_tokens: int = 32) -> tuple[list[str], list[float]]:
    choice = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=max_tokens, temperature=0, logprobs=True
    ).choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    return [t.token for t in choice.logprobs.content], [t.logprob for t in choice.logprobs.content]


def metric(server: Server, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_memory_bytes_shrink_by_the_kv_bytes_saved(server: Server) -> None:
    found = residents(server)
    base, q8, q4 = found[DEFAULT_MODEL], found["kv8"], found["kv4"]
    assert (base["load_options"]["kv_bits"], q8["load_options"]["kv_bits"], q4["load_options"]["kv_bits"]) == (0, 8, 4)
    cells = SLOTS * CONTEXT
    assert base["memory_bytes"] - q8["memory_bytes"] == (KV_PER_TOKEN[0] - KV_PER_TOKEN[8]) * cells
    assert base["memory_bytes"] - q4["memory_bytes"] == (KV_PER_TOKEN[0] - KV_PER_TOKEN[4]) * cells
    weights = base["memory_bytes"] - KV_PER_TOKEN[0] * cells
    assert (q8["memory_bytes"] - weights) / (base["memory_bytes"] - weights) <= 0.55  # the bound
    assert (q4["memory_bytes"] - weights) / (base["memory_bytes"] - weights) <= 0.3


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_answers_agree_with_the_f16_cache(client: openai.OpenAI, bits: int) -> None:
    tokens, logprobs = greedy(client, DEFAULT_MODEL)
    answer = greedy(client, f"kv{bits}")
    assert answer[0] == tokens
    diffs = [abs(a - b) for a, b in zip(answer[1], logprobs, strict=True)]
    assert 0 < sum(diffs) / len(diffs) < MEAN_LOGPROB_DIFF[bits]  # > 0: the cache really is quantized
    assert greedy(client, f"kv{bits}") == answer  # and a quantized cache is deterministic


def test_a_seeded_request_repeats_and_reuses_its_prefix(client: openai.OpenAI, server: Server) -> None:
    def sample() -> tuple[str, list[float]]:
        choice = client.completions.create(
            model="kv4", prompt="A dragon and a knight met", max_tokens=16, temperature=1.0, seed=3, logprobs=1
        ).choices[0]
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        return choice.text, choice.logprobs.token_logprobs

    first = sample()
    hits = metric(server, "impetus_prompt_cache_hits_total")
    assert sample() == first
    assert metric(server, "impetus_prompt_cache_hits_total") == hits + 1  # the slot's quantized cells reused


def test_eight_streams_decode_together_on_a_quantized_cache(client: openai.OpenAI, server: Server) -> None:
    texts: dict[int, str] = {}
    seen: list[float] = []

    def stream(i: int) -> None:
        parts = client.chat.completions.create(
            model="kv8",
            messages=[{"role": "user", "content": f"Count from {i} to {i + 30}."}],
            max_tokens=48,
            temperature=0.7,
            seed=i,
            stream=True,
        )
        texts[i] = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen.append(metric(server, "impetus_active_sequences"))
        time.sleep(0.05)
    assert len(texts) == SLOTS and all(texts.values())
    assert max(seen) >= 4  # decoded together, not one after another


def test_a_preset_s_kv_bits_loads_its_own_resident(client: openai.OpenAI, server: Server) -> None:
    preset = {"name": "q4chat", "model": DEFAULT_MODEL, "kv_bits": 4, "parameters": {"max_tokens": 3}}
    r = requests.put(server.url + "/api/presets/q4chat", json=preset, timeout=30)
    assert r.status_code == 200, r.text
    answer = client.chat.completions.create(model="q4chat", messages=ASK)
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert residents(server)["q4chat"]["load_options"]["kv_bits"] == 4


@pytest.mark.parametrize("where", ["load", "preset"])
def test_bits_other_than_0_4_8_are_a_400_naming_kv_bits(server: Server, where: str) -> None:
    if where == "load":
        r = load(server, alias="kv3", kv_bits=3)
    else:
        r = requests.put(
            server.url + "/api/presets/kv3", json={"name": "kv3", "model": DEFAULT_MODEL, "kv_bits": 3}, timeout=30
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_bits", r.text


def test_kv_bits_on_an_mlx_model_that_cannot_take_it_is_a_400_naming_it(server: Server) -> None:
    """MLX quantizes its batched KV cache too (tests/api/test_kv_quant_mlx.py), in groups of 64 along
    the head: the tiny MLX llama's heads are 16 wide, so ``kv_bits`` on it is refused, never ignored."""
    model = "tiny"
    r = load(server, model=model, backend="mlx", kv_bits=8, alias="mlx8")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "kv_bits" and "head size 16" in r.json()["error"]["message"]
    assert "mlx8" not in residents(server)
    assert load(server, model=model, backend="mlx", kv_bits=0, alias="mlx0").status_code == 200  # 0: off, fine
    requests.post(server.url + "/api/models/unload", json={"model": "mlx0"}, timeout=60)


def test_impetus_kv_bits_reaches_the_loaders() -> None:
    options = EngineOptions.from_settings(Settings.from_mapping({"kv_bits": 8})).backend_options
    assert options.kv_bits == 8
    assert LoadOptions().kv_bits_for(options.kv_bits) == 8  # the server's default
    assert LoadOptions(kv_bits=0).kv_bits_for(options.kv_bits) == 0  # a load may turn it off
    assert LoadOptions(kv_bits=4).kv_bits_for(0) == 4
    with pytest.raises(ValueError, match="kv_bits"):
        Settings.from_mapping({"kv_bits": 3})
