"""/api/models and the registry behind it, on a real server with models the test builds."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gerdsen_ai_server.engine.formats.safetensors import tokenizer_bytes
from tests.support import DEFAULT_MODEL
from tests.support.http import chat
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama, weights_bytes

pytestmark = pytest.mark.server

DEFAULT_FP32_BYTES = 538_060_032  # SmolLM2-135M dequantized to float32 (its parameters' nbytes)


def default_bytes() -> int:
    """What the registry charges for it: its float32 weights and its tokenizer (safetensors.tokenizer_bytes)."""
    return DEFAULT_FP32_BYTES + tokenizer_bytes(default_model_folder())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    default = default_model_folder()
    shutil.copytree(default, root / DEFAULT_MODEL)
    for seed, name in enumerate(("tiny-a", "tiny-b", "org--tiny-c")):
        build_tiny_llama(root / name, default, seed=seed)
    build_tiny_llama(root / "big", default, hidden=256, layers=4)
    (root / "exported-onnx").mkdir()
    (root / "exported-onnx" / "model.onnx").write_bytes(b"\x08\x07")
    broken = root / "broken"
    shutil.copytree(root / "tiny-a", broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    truncated = root / "truncated"  # a header that reads fine, the data cut: fails midway through the load
    shutil.copytree(root / "tiny-a", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    # Room for the default model and exactly one tiny model, not two; the big one never fits.
    tiny = weights_bytes(models_dir / "tiny-a") + tokenizer_bytes(models_dir / "tiny-a")
    budget = default_bytes() + int(tiny * 1.5)
    server = start_server(
        tmp_path_factory.mktemp("registry"),
        IMPETUS_MODELS_DIR=str(models_dir),
        IMPETUS_MEMORY_BUDGET=str(budget),
        IMPETUS_KEEP_ALIVE="300",
        # Forced: under auto the default's float32 weights and KV cache would not fit this budget, so it
        # would stay 4-bit (engine/dtype.py; tests/engine/test_compute_dtype.py tests that choice).
        IMPETUS_COMPUTE_DTYPE="float32",
    )
    yield server
    stop_server(server, wait=False)


def listing(srv: Server) -> dict[str, dict]:  # type: ignore[type-arg]
    body = requests.get(f"{srv.url}/api/models", timeout=30).json()
    return {m["id"]: m for m in body["data"]}


def resident(srv: Server) -> set[str]:
    return {k for k, v in listing(srv).items() if v["state"] == "resident"}


def unload_all_tiny(srv: Server) -> None:
    for model in resident(srv) - {DEFAULT_MODEL}:
        requests.post(f"{srv.url}/api/models/unload", json={"model": model}, timeout=60)


def test_listing_shows_resident_and_local_models(srv: Server) -> None:
    models = listing(srv)
    assert models[DEFAULT_MODEL]["state"] == "resident" and models[DEFAULT_MODEL]["pinned"] is True
    assert models[DEFAULT_MODEL]["memory_bytes"] == default_bytes()
    assert models[DEFAULT_MODEL]["compute_dtype"] == "float32"
    assert models[DEFAULT_MODEL]["compute_dtype_reason"] == "IMPETUS_COMPUTE_DTYPE=float32"
    assert models["tiny-a"]["state"] == "local" and models["tiny-a"]["format"] == "mlx"
    assert models["org/tiny-c"]["state"] == "local"
    assert "ONNX" in models["exported-onnx"]["error"]
    body = requests.get(f"{srv.url}/api/models", timeout=30).json()
    assert body["memory_used_bytes"] == default_bytes()
    assert requests.get(f"{srv.url}/api/models/tiny-a", timeout=30).json()["state"] == "local"
    assert requests.get(f"{srv.url}/api/models/nope", timeout=30).status_code == 404


def test_load_generate_unload(srv: Server) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "resident" and r.json()["keep_alive"] == 300
    assert chat(srv, model="tiny-a").json()["usage"]["completion_tokens"] >= 1
    assert "tiny-a" in [m["id"] for m in requests.get(f"{srv.base_url}/models", timeout=30).json()["data"]]
    r = requests.post(f"{srv.url}/api/models/unload", json={"model": "tiny-a"}, timeout=60)
    assert r.status_code == 200
    assert "tiny-a" not in resident(srv)
    assert requests.post(f"{srv.url}/api/models/unload", json={"model": "tiny-a"}, timeout=60).status_code == 404


def test_request_naming_a_local_model_loads_it_on_demand_even_with_a_slash(srv: Server) -> None:
    unload_all_tiny(srv)
    r = chat(srv, model="org/tiny-c")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "org/tiny-c"
    assert "org/tiny-c" in resident(srv)


def test_lru_idle_model_is_evicted_to_make_room(srv: Server) -> None:
    unload_all_tiny(srv)
    assert chat(srv, model="tiny-a").status_code == 200
    assert chat(srv, model="tiny-b").status_code == 200  # does not fit beside tiny-a: tiny-a goes
    assert resident(srv) == {DEFAULT_MODEL, "tiny-b"}


def test_a_generating_model_is_never_evicted(srv: Server) -> None:
    unload_all_tiny(srv)
    assert chat(srv, model="tiny-a").status_code == 200
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
    with requests.post(f"{srv.base_url}/chat/completions", json=body, stream=True, timeout=120) as stream:
        lines = stream.iter_lines()
        next(lines)
        r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-b"}, timeout=120)
        assert r.status_code == 422 and r.json()["error"]["code"] == "insufficient_memory"
        r = requests.post(f"{srv.url}/api/models/unload", json={"model": "tiny-a"}, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_busy"
    deadline = time.monotonic() + 30
    while requests.post(f"{srv.url}/api/models/unload", json={"model": "tiny-a"}, timeout=60).status_code != 200:
        assert time.monotonic() < deadline  # once the client is gone the model is idle again
        time.sleep(0.2)


def test_model_larger_than_budget_is_refused(srv: Server) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "big"}, timeout=120)
    assert r.status_code == 422 and r.json()["error"]["code"] == "insufficient_memory"
    assert "IMPETUS_MEMORY_BUDGET" in r.json()["error"]["message"]


def test_keep_alive_unloads_an_idle_model(srv: Server) -> None:
    unload_all_tiny(srv)
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a", "keep_alive": 1}, timeout=120)
    assert r.json()["keep_alive"] == 1
    deadline = time.monotonic() + 15
    while "tiny-a" in resident(srv):
        assert time.monotonic() < deadline
        time.sleep(0.25)
    assert DEFAULT_MODEL in resident(srv)  # pinned: never expires


def test_per_request_keep_alive(srv: Server) -> None:
    unload_all_tiny(srv)
    r = requests.post(
        f"{srv.base_url}/completions",
        timeout=120,
        json={"model": "tiny-b", "prompt": "hi", "max_tokens": 2, "keep_alive": -1},
    )
    assert r.status_code == 200, r.text
    assert listing(srv)["tiny-b"]["keep_alive"] is None  # kept loaded


def test_concurrent_loads_of_one_model_load_it_once(srv: Server) -> None:
    unload_all_tiny(srv)
    before = srv.log().count("loaded tiny-a (")
    results: list[int] = []

    def load() -> None:
        results.append(requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a"}, timeout=120).status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert srv.log().count("loaded tiny-a (") == before + 1


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("exported-onnx", 422, "unsupported_model_format"),
        ("broken", 422, "model_load_failed"),
        ("truncated", 422, "model_load_failed"),
        ("no-such-model", 404, "model_not_found"),
    ],
)
def test_load_errors_are_clear_and_the_server_keeps_serving(srv: Server, model: str, status: int, code: str) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": model}, timeout=120)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert chat(srv, model=DEFAULT_MODEL).status_code == 200


def test_load_body_is_validated(srv: Server) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": ""}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a", "warp": 9}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "warp"


# ---- warm-up and per-model benchmarks (issue 4, item 7) ----------------------------------------


def test_load_with_warmup_reports_cold_and_warm_ttft(srv: Server) -> None:
    unload_all_tiny(srv)
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a", "warmup": True}, timeout=120)
    assert r.status_code == 200, r.text
    warmup = r.json()["warmup"]
    assert warmup["prompt_tokens"] == 16 and warmup["cold_ttft_ms"] > 0 and warmup["warm_ttft_ms"] > 0
    print(f"tiny-a warm-up: TTFT cold {warmup['cold_ttft_ms']} ms, warm {warmup['warm_ttft_ms']} ms")
    assert requests.get(f"{srv.url}/api/models/tiny-a", timeout=30).json()["warmup"] == warmup
    # Loaded again without warm-up: still resident, the result kept; a plain load reports none.
    assert requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a"}, timeout=120).json()["warmup"] == warmup
    unload_all_tiny(srv)
    assert requests.post(f"{srv.url}/api/models/load", json={"model": "tiny-a"}, timeout=120).json()["warmup"] is None


def test_benchmark_measures_and_keeps_a_history_for_an_id_with_a_slash(srv: Server, models_dir: Path) -> None:
    unload_all_tiny(srv)
    url = f"{srv.url}/api/models/org/tiny-c/benchmark"
    assert requests.get(url, timeout=30).json() == {"object": "list", "model": "org/tiny-c", "data": []}
    runs = []
    for _ in range(2):
        r = requests.post(url, json={"prompt_tokens": 40, "max_tokens": 12}, timeout=120)
        assert r.status_code == 200, r.text
        runs.append(r.json())
    run = runs[-1]
    assert run["model"] == "org/tiny-c" and run["prompt_tokens"] == 40
    assert run["generated_tokens"] == 12  # end-of-sequence is suppressed: always the full length
    assert run["ttft_ms"] > 0 and run["prompt_tokens_per_second"] > 0 and run["generation_tokens_per_second"] > 0
    assert run["peak_memory_bytes"] >= run["model_memory_bytes"] > 0
    assert run["compute_dtype"] == "float32" and run["device"] == "cpu"
    print(
        f"org/tiny-c: prompt {run['prompt_tokens_per_second']} tok/s, generation "
        f"{run['generation_tokens_per_second']} tok/s, TTFT {run['ttft_ms']} ms, peak {run['peak_memory_bytes']} B"
    )
    history = requests.get(url, timeout=30).json()["data"]
    assert [h["id"] for h in history] == [r["id"] for r in runs]
    assert (models_dir / ".impetus" / "benchmarks.json").is_file()
    assert ".impetus" not in listing(srv)
    # A bare POST uses the defaults (128-token prompt, 64 tokens).
    r = requests.post(url, timeout=120)
    assert r.status_code == 200 and (r.json()["prompt_tokens"], r.json()["generated_tokens"]) == (128, 64)


def test_benchmark_errors(srv: Server) -> None:
    r = requests.post(f"{srv.url}/api/models/nope/benchmark", json={}, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
    assert requests.get(f"{srv.url}/api/models/org/nope/benchmark", timeout=30).status_code == 404
    r = requests.post(f"{srv.url}/api/models/tiny-a/benchmark", json={"prompt_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_tokens"
    r = requests.post(f"{srv.url}/api/models/tiny-a/benchmark", json={"runs": 3}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "runs"
    r = requests.post(
        f"{srv.url}/api/models/tiny-a/benchmark", json={"prompt_tokens": 500, "max_tokens": 100}, timeout=120
    )  # the tiny models' context is 512
    assert (r.status_code, r.json()["error"]["code"]) == (400, "context_length_exceeded"), r.text


@pytest.mark.slow
def test_a_second_benchmark_of_a_model_while_one_runs_is_a_409(srv: Server) -> None:
    url = f"{srv.url}/api/models/{DEFAULT_MODEL}/benchmark"
    first: list[requests.Response] = []
    # 64 tokens of the default model: seconds of decoding, long enough to be caught running
    thread = threading.Thread(target=lambda: first.append(requests.post(url, json={"max_tokens": 64}, timeout=300)))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while requests.get(f"{srv.url}/health", timeout=30).json()["requests_in_flight"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = requests.post(url, json={"max_tokens": 2}, timeout=60)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "benchmark_running")
    finally:
        thread.join()
    assert first[0].status_code == 200 and first[0].json()["generated_tokens"] == 64


def test_benchmark_store_is_bounded(tmp_path: Path) -> None:
    from gerdsen_ai_server.engine.benchmark import BenchmarkStore
    from gerdsen_ai_server.schemas.models import BenchmarkResult

    store = BenchmarkStore(tmp_path / "b.json", per_model=3, max_models=2)

    def run(model: str, n: int) -> BenchmarkResult:
        return BenchmarkResult(
            id=f"{model}-{n}",
            model=model,
            created_at=n,
            prompt_tokens=1,
            generated_tokens=2,
            ttft_ms=1,
            prompt_tokens_per_second=1,
            generation_tokens_per_second=1,
            model_memory_bytes=1,
            compute_dtype="float32",
            device="cpu",
            other_requests=0,
        )

    for n in range(5):
        store.add(run("a", n))
    store.add(run("b", 0))
    store.add(run("c", 0))  # a is the least recently benchmarked: dropped
    assert [r.id for r in store.history("b")] == ["b-0"] and store.history("a") == []
    store.add(run("b", 1))
    store.add(run("d", 0))
    assert [r.id for r in store.history("b")] == ["b-0", "b-1"] and store.history("c") == []
    (tmp_path / "b.json").write_text("{broken")
    assert store.history("b") == []  # a damaged file loses the history, never the endpoint
