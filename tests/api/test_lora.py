"""LoRA adapters through the real server (issue 26 item 7): ``adapter`` in POST /api/models/load and
per-request ``adapters`` (mlx_lm.server's field), checked against mlx-lm's own ``load(adapter_path=...)``
on a tiny random adapter built here; confined like a model; one that does not fit is a clear 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests

from gerdsen_ai_server.engine.formats.adapters import adapter_not_found
from tests.support import DEFAULT_MODEL
from tests.support.gguf import build_tiny_gguf
from tests.support.lora import build_tiny_adapter, reference_logprobs, write_gguf_lora
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama

pytestmark = pytest.mark.server

PROMPTS = [[1, 504, 2365, 282, 260], [1, 28120, 30, 216, 7844, 3, 14, 827]]  # token ids: no tokenizer choices
TOP = 5


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/models (the models dir: tiny, its adapters, one for another shape) and root/outside."""
    root = tmp_path_factory.mktemp("lora")
    models, outside = root / "models", root / "outside"
    default = default_model_folder()
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default)
    build_tiny_llama(models / "tiny", default, seed=1)
    build_tiny_adapter(models / "tiny-lora", models / "tiny", seed=1)
    build_tiny_adapter(models / "tiny-lora-b", models / "tiny", seed=2, rank=2, num_layers=1)
    build_tiny_llama(root / "narrow", default, hidden=32, seed=3)
    build_tiny_adapter(models / "narrow-lora", root / "narrow")
    build_tiny_adapter(outside / "lora", models / "tiny", seed=4)
    (models / "presets").mkdir()
    preset = {"name": "lora-preset", "model": "tiny", "adapter": "tiny-lora", "description": "tiny with tiny-lora"}
    (models / "presets" / "lora-preset.json").write_text(json.dumps(preset))
    # llama.cpp: a tiny random llama GGUF (64 wide, 2 blocks: loads and answers in milliseconds, where the
    # default model takes seconds a load) and GGUF LoRAs for it. Same seed, so the same A and B: twice B
    # at alpha = rank is once B at alpha = 2 x rank.
    build_tiny_gguf(models / "llama.gguf", default, seed=5)
    fits = {"n_embd": 64, "layers": 2}
    write_gguf_lora(models / "llama-zero.gguf", b_scale=0.0, **fits)
    write_gguf_lora(models / "llama-2b.gguf", b_scale=0.1, alpha=4.0, **fits)
    write_gguf_lora(models / "llama-alpha.gguf", b_scale=0.05, alpha=8.0, **fits)
    write_gguf_lora(models / "llama-narrow.gguf", n_embd=32, layers=2)
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Iterator[Server]:
    server = start_server(  # no default model: every test here loads what it serves
        tmp_path_factory.mktemp("lora-server"),
        wait_ready=False,
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_MODELS_DIR=str(tree / "models"),
        IMPETUS_BACKEND="auto",  # a user's GGUF on llama.cpp, an MLX folder on MLX (engine/backends/choice.py)
    )
    yield server
    stop_server(server, wait=False)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0, timeout=120)


def top_logprobs(client: openai.OpenAI, model: str, prompt: list[int], **extra: Any) -> list[float]:
    """The first generated token's top log-probabilities (greedy), highest first."""
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=TOP, extra_body=extra or None
    )
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.top_logprobs
    return sorted(reply.choices[0].logprobs.top_logprobs[0].values(), reverse=True)


def reference_top(tree: Path, adapter: str | None, prompt: list[int]) -> list[float]:
    logprobs = reference_logprobs(
        tree / "models" / "tiny", None if adapter is None else tree / "models" / adapter, prompt
    )
    return sorted(np.sort(logprobs)[-TOP:].tolist(), reverse=True)


def models_listing(srv: Server) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in requests.get(f"{srv.url}/api/models", timeout=30).json()["data"]}


def test_a_model_loaded_with_an_adapter_is_its_own_resident_and_matches_mlx_lm(
    srv: Server, client: openai.OpenAI, tree: Path
) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny", "adapter": "tiny-lora"}, timeout=300)
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["id"], info["adapter"], info["state"]) == ("tiny+tiny-lora", "tiny-lora", "resident")
    base = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny"}, timeout=300).json()
    assert base["id"] == "tiny" and base["adapter"] is None
    assert info["memory_bytes"] > base["memory_bytes"]  # the LoRA layers count
    assert {"tiny", "tiny+tiny-lora"} <= {m.id for m in client.models.list().data}
    listing = models_listing(srv)
    assert listing["tiny+tiny-lora"]["adapter"] == "tiny-lora"
    for name, fmt in (("tiny-lora", "mlx"), ("llama-2b.gguf", "gguf")):  # the models dir's adapters, as such
        assert (listing[name]["kind"], listing[name]["format"], listing[name]["error"]) == ("adapter", fmt, None)
    assert listing["llama.gguf"]["kind"] == "language"

    for prompt in PROMPTS:
        adapted = top_logprobs(client, "tiny+tiny-lora", prompt)
        plain = top_logprobs(client, "tiny", prompt)
        np.testing.assert_allclose(adapted, reference_top(tree, "tiny-lora", prompt), atol=2e-3)
        np.testing.assert_allclose(plain, reference_top(tree, None, prompt), atol=2e-3)
        assert np.abs(np.array(adapted) - np.array(plain)).max() > 0.05  # the adapter changes the logits


def test_per_request_adapters_load_their_own_resident_and_batch_beside_the_base(
    srv: Server, client: openai.OpenAI, tree: Path
) -> None:
    want_base = [reference_top(tree, None, p) for p in PROMPTS]
    want_lora = [reference_top(tree, "tiny-lora-b", p) for p in PROMPTS]
    first = top_logprobs(client, "tiny", PROMPTS[0], adapters="tiny-lora-b")  # loads tiny+tiny-lora-b
    np.testing.assert_allclose(first, want_lora[0], atol=2e-3)
    assert models_listing(srv)["tiny+tiny-lora-b"]["adapter"] == "tiny-lora-b"

    jobs = [(i % 2, i % 3 == 0) for i in range(12)]  # (prompt, with the adapter), at the same time
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(
            pool.map(
                lambda job: top_logprobs(
                    client, "tiny", PROMPTS[job[0]], **({"adapters": "tiny-lora-b"} if job[1] else {})
                ),
                jobs,
            )
        )
    for (prompt, with_adapter), values in zip(jobs, got, strict=True):
        np.testing.assert_allclose(values, (want_lora if with_adapter else want_base)[prompt], atol=2e-3)

    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        extra_body={"adapters": "tiny-lora-b"},
    )
    assert chat.model == "tiny+tiny-lora-b" and chat.choices[0].message.content is not None
    r = requests.post(f"{srv.url}/api/models/unload", json={"model": "tiny+tiny-lora-b"}, timeout=60)
    assert r.status_code == 200, r.text
    assert "tiny+tiny-lora-b" not in models_listing(srv) and "tiny" in {m.id for m in client.models.list().data}


def test_an_adapter_outside_the_models_dir_is_a_404_like_a_model(
    srv: Server, client: openai.OpenAI, tree: Path
) -> None:
    outside = tree / "outside" / "lora"
    for spec in (str(outside), "../outside/lora", "~/lora", "no-such-adapter"):
        r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny", "adapter": spec}, timeout=60)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found"), (spec, r.text)
        assert r.json()["error"]["message"] == str(adapter_not_found(spec))
        assert str(tree) not in r.text.replace(spec, "").replace(spec.replace("/", "\\/"), "")
        with pytest.raises(openai.NotFoundError) as caught:
            top_logprobs(client, "tiny", PROMPTS[0], adapters=spec)
        assert caught.value.body["param"] == "adapters"  # type: ignore[index]
        assert caught.value.body["message"] == str(adapter_not_found(spec))  # type: ignore[index]
    assert all(m.get("adapter") in (None, "tiny-lora", "tiny-lora-b") for m in models_listing(srv).values())


def test_an_adapter_that_does_not_fit_is_a_clear_4xx_and_the_server_carries_on(
    srv: Server, client: openai.OpenAI, tree: Path
) -> None:
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny", "adapter": "narrow-lora"}, timeout=300)
    assert r.status_code == 422, r.text
    assert "The adapter 'narrow-lora' does not fit this model" in r.json()["error"]["message"]
    assert "does not match model parameter shape" in r.json()["error"]["message"]
    assert str(tree) not in r.text
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        top_logprobs(client, "tiny", PROMPTS[0], adapters="narrow-lora")
    assert caught.value.body["param"] == "adapters"  # type: ignore[index]
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny", "adapter": "tiny"}, timeout=60)
    assert r.status_code == 422 and "is not a LoRA adapter" in r.json()["error"]["message"], r.text
    r = requests.post(f"{srv.url}/api/models/load", json={"model": "tiny", "adapter": ""}, timeout=60)
    assert r.status_code == 400, r.text
    assert "tiny+narrow-lora" not in models_listing(srv)
    np.testing.assert_allclose(
        top_logprobs(client, "tiny", PROMPTS[1]), reference_top(tree, None, PROMPTS[1]), atol=2e-3
    )
    assert json.loads(requests.get(f"{srv.url}/health/ready", timeout=30).text)


def test_a_gguf_lora_on_llama_cpp_changes_the_logits_and_its_alpha_scales_it(
    srv: Server, client: openai.OpenAI
) -> None:
    base = top_logprobs(client, "llama.gguf", PROMPTS[0])
    zero = top_logprobs(client, "llama.gguf", PROMPTS[0], adapters="llama-zero.gguf")
    double_b = top_logprobs(client, "llama.gguf", PROMPTS[0], adapters="llama-2b.gguf")
    double_alpha = top_logprobs(client, "llama.gguf", PROMPTS[0], adapters="llama-alpha.gguf")
    np.testing.assert_allclose(zero, base, atol=1e-4)  # B = 0: the adapter path adds nothing
    assert np.abs(np.array(double_b) - np.array(base)).max() > 0.05
    np.testing.assert_allclose(double_b, double_alpha, atol=2e-3)  # llama.cpp scales by alpha / rank
    info = models_listing(srv)["llama.gguf+llama-2b.gguf"]
    assert (info["format"], info["adapter"]) == ("gguf", "llama-2b.gguf")
    for model, adapter, words in (
        ("llama.gguf", "llama-narrow.gguf", "llama.cpp refused it"),
        ("llama.gguf", "tiny-lora", "needs a GGUF LoRA file"),
        ("tiny", "llama-2b.gguf", "needs an mlx-lm adapter folder"),
    ):
        r = requests.post(f"{srv.url}/api/models/load", json={"model": model, "adapter": adapter}, timeout=300)
        assert r.status_code == 422 and words in r.json()["error"]["message"], (adapter, r.text)
        assert f"The adapter '{adapter}' does not fit this model" in r.json()["error"]["message"]
    assert "llama.gguf+llama-narrow.gguf" not in models_listing(srv)
    np.testing.assert_allclose(top_logprobs(client, "llama.gguf", PROMPTS[0]), base, atol=1e-4)


def test_a_preset_with_an_adapter_serves_it_under_the_presets_name(
    srv: Server, client: openai.OpenAI, tree: Path
) -> None:
    values = top_logprobs(client, "lora-preset", PROMPTS[1])
    np.testing.assert_allclose(values, reference_top(tree, "tiny-lora", PROMPTS[1]), atol=2e-3)
    info = models_listing(srv)["lora-preset"]
    assert (info["preset"], info["adapter"]) == ("lora-preset", "tiny-lora")
