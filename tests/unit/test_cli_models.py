"""`impetus pull / list / rm` against a stand-in hub on loopback (no server, no real hub)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gerdsen_ai_server.cli import commands as cli
from tests.support.hub_stub import HubStub

REPO = "test-org/fake-model"
FILES = {
    "config.json": json.dumps({"model_type": "llama"}).encode(),
    # Not a usable model, but the files `impetus list` needs to call it an MLX folder.
    "model.safetensors": os.urandom(300_000),
    "tokenizer.json": b"{}",
    "README.md": b"# not pulled: not a model file",
    "pytorch_model.bin": b"not pulled either",
}


@pytest.fixture(scope="module")
def stub() -> Iterator[HubStub]:
    stub = HubStub().start()
    stub.add_repo(REPO, FILES)
    stub.add_repo("test-org/ggufs", {"a.Q4_K_M.gguf": b"GGUF" + bytes(100), "a.Q8_0.gguf": b"GGUF" + bytes(200)})
    yield stub
    stub.stop()


@pytest.fixture
def hub_env(stub: HubStub, monkeypatch: pytest.MonkeyPatch) -> HubStub:
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return stub


def test_pull_list_rm(hub_env: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pull", REPO, "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    folder = tmp_path / "test-org--fake-model"
    assert f"pulled {REPO} into {folder}" in out.out
    assert "B/s" in out.err or "B" in out.err  # the tqdm bar
    assert sorted(p.name for p in folder.iterdir()) == [
        ".impetus-pull.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]

    (tmp_path / "local-only").mkdir()
    (tmp_path / "local-only" / "model.onnx").write_bytes(b"\x08")
    assert cli.main(["list", "--models-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "FORMAT", "SIZE", "SOURCE"]
    pulled = next(line for line in lines if line.startswith(REPO)).split()
    commit = hub_env.repos[REPO].commit
    assert pulled[1:] == ["mlx", "300.6", "KB", f"{REPO}@{commit[:7]}"]
    unusable = next(line for line in lines if line.startswith("local-only"))
    assert "unusable: " in unusable and "is a ONNX model, which Impetus cannot run" in unusable

    assert cli.main(["rm", REPO, "--models-dir", str(tmp_path)]) == 0
    assert f"removed {REPO}" in capsys.readouterr().out
    assert not folder.exists()
    assert cli.main(["rm", REPO, "--models-dir", str(tmp_path)]) == 1
    assert f"no model '{REPO}'" in capsys.readouterr().err
    assert cli.main(["rm", "../etc", "--models-dir", str(tmp_path)]) == 1


def test_pull_gguf_by_pattern(hub_env: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pull", "test-org/ggufs", "--models-dir", str(tmp_path)]) == 1
    assert "several GGUF files (a.Q4_K_M.gguf, a.Q8_0.gguf)" in capsys.readouterr().err
    assert cli.main(["pull", "test-org/ggufs", "--gguf", "*Q8_0.gguf", "--models-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "test-org--ggufs").iterdir()) == [".impetus-pull.json", "a.Q8_0.gguf"]
    assert cli.main(["list", "--models-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["test-org/ggufs", "gguf"]


def test_pull_gguf_by_file_or_ollama_tag_fetches_only_that_file(
    hub_env: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gerdsen_ai_server.schemas.pulls import PullRequest
    from gerdsen_ai_server.store.pulls import PullManager

    repo = "test-org/tagged"
    hub_env.add_repo(repo, {f"m-{q}.gguf": b"GGUF" + bytes(n) for q, n in (("Q4_K_M", 100), ("Q8_0", 200))})
    # Ollama's hf.co/org/name:TAG, the tag in any case: only the one file is requested, let alone written.
    assert cli.main(["pull", f"hf.co/{repo}:q4_k_m", "--models-dir", str(tmp_path / "a")]) == 0
    assert f"pulled {repo} into" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "a" / "test-org--tagged").iterdir()) == [
        ".impetus-pull.json",
        "m-Q4_K_M.gguf",
    ]
    assert hub_env.requests_for(repo, "m-Q8_0.gguf") == []
    assert cli.main(["pull", repo, "--file", "*Q8_0.gguf", "--models-dir", str(tmp_path / "b")]) == 0
    assert [p.name for p in (tmp_path / "b" / "test-org--tagged").glob("*.gguf")] == ["m-Q8_0.gguf"]
    assert cli.main(["pull", f"{repo}:Q8_0", "--file", "*.gguf", "--models-dir", str(tmp_path / "c")]) == 1
    assert "give one of them" in capsys.readouterr().err
    # The pull API: the same tag in "model", which the schema lets through.
    assert PullRequest.model_validate({"model": f"hf.co/{repo}:Q8_0"}).model == f"hf.co/{repo}:Q8_0"
    with pytest.raises(ValueError, match="model"):
        PullRequest.model_validate({"model": f"{repo}:Q8 0"})
    manager = PullManager(tmp_path / "d", endpoint=hub_env.url)
    state = manager.join(manager.start(f"{repo}:Q8_0")["id"], timeout=30)
    assert state is not None and state["status"] == "done" and state["model"] == repo, state
    assert [p.name for p in (tmp_path / "d" / "test-org--tagged").glob("*.gguf")] == ["m-Q8_0.gguf"]


def test_a_vision_gguf_pull_brings_its_projector(hub_env: HubStub, tmp_path: Path) -> None:
    """ggml-org's vision GGUF repos ship mmproj files beside the model files: the projector (f16 first) comes
    with the chosen model file, as LM Studio fetches it, and is never the model itself (issue 30)."""
    repo = "test-org/vision"
    files = {f"m-{q}.gguf": b"GGUF" + bytes(n) for q, n in (("Q4_K_M", 100), ("Q8_0", 200))}
    files |= {"mmproj-m-f32.gguf": b"GGUF" + bytes(40), "mmproj-m-f16.gguf": b"GGUF" + bytes(20)}
    hub_env.add_repo(repo, files)
    assert cli.main(["pull", f"hf.co/{repo}:Q4_K_M", "--models-dir", str(tmp_path / "a")]) == 0
    pulled = sorted(p.name for p in (tmp_path / "a" / "test-org--vision").glob("*.gguf"))
    assert pulled == ["m-Q4_K_M.gguf", "mmproj-m-f16.gguf"]
    assert hub_env.requests_for(repo, "mmproj-m-f32.gguf") == []
    one = "test-org/vision-one"
    hub_env.add_repo(one, {"v.gguf": b"GGUF" + bytes(100), "mmproj-v-f16.gguf": b"GGUF" + bytes(20)})
    # One model file and its projector: no pattern needed (before, "several GGUF files").
    assert cli.main(["pull", one, "--models-dir", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b" / "test-org--vision-one").glob("*.gguf")) == [
        "mmproj-v-f16.gguf",
        "v.gguf",
    ]


@pytest.mark.timing
def test_pull_without_a_hub_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "IMPETUS_MODELS_DIR": str(tmp_path)}
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gerdsen_ai_server.cli", "pull", REPO],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"impetus: cannot reach the Hugging Face hub at {endpoint}: " in result.stderr
    assert time.monotonic() - began < 20  # a Python start plus one refused connection
    assert not (tmp_path / "test-org--fake-model").exists()
