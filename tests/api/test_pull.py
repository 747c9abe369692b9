"""Pull, cancel, delete and discover over HTTP, on a real server whose HF_ENDPOINT is a stand-in hub on loopback.

The server runs the real huggingface_hub download code; only the hub is ours (tests/support/hub_stub.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.store import download, hub
from gerdsen_ai_server.store.pulls import PullManager
from tests.support.hub_stub import HubStub
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama

pytestmark = pytest.mark.server

REPO = "mlx-community/tiny-llama-test"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loadable tiny llama (about 13 MB of weights) with the real SmolLM2 tokenizer."""
    default = default_model_folder()
    return build_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", default)


@pytest.fixture(scope="module")
def stub(source: Path) -> Iterator[HubStub]:
    stub = HubStub().start()
    for repo in (REPO, "test/tiny-drop", "test/tiny-corrupt", "test/tiny-slow", "test/tiny-events"):
        stub.add_folder(repo, source, downloads=10)
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_llama(root / "tiny-default", source)
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, stub: HubStub, models_dir: Path) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("pull"),
        IMPETUS_MODELS_DIR=str(models_dir),
        IMPETUS_DEFAULT_MODEL=str(models_dir / "tiny-default"),
        HF_ENDPOINT=stub.url,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
    )
    yield server
    stop_server(server, wait=False)


def start(srv: Server, repo: str, **body: Any) -> dict[str, Any]:
    r = requests.post(f"{srv.url}/api/models/pull", json={"model": repo, **body}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/api/models/pulls/{r.json()['id']}"
    return r.json()


def wait(srv: Server, pull_id: str, until: Any = None, timeout: float = 60) -> list[dict[str, Any]]:
    """Poll a pull until it finishes (or ``until(state)``); returns every state seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(f"{srv.url}/api/models/pulls/{pull_id}", timeout=30).json()
        seen.append(state)
        if state["status"] in ("done", "failed", "cancelled") or (until and until(state)):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"pull {pull_id} still {seen[-1]} after {timeout} s")


def same_files(folder: Path, source: Path) -> bool:
    return all((folder / p.name).read_bytes() == p.read_bytes() for p in source.iterdir())


def test_pull_reports_progress_then_the_model_loads_and_deletes(srv: Server, source: Path, models_dir: Path) -> None:
    first = start(srv, REPO)
    assert first["status"] in ("queued", "downloading") and first["model"] == REPO
    states = wait(srv, first["id"])
    last = states[-1]
    assert last["status"] == "done", last
    total = sum(p.stat().st_size for p in source.iterdir())
    assert last["bytes_done"] == last["bytes_total"] == total
    done = [s["bytes_done"] for s in states]
    assert done == sorted(done)
    folder = models_dir / "mlx-community--tiny-llama-test"
    assert last["path"] == str(folder)
    assert LoaderFactory().detect(folder) == "mlx" and same_files(folder, source)
    assert not list((models_dir / ".pulls").glob("mlx-community--tiny-llama-test*/"))
    assert any(p["id"] == first["id"] for p in requests.get(f"{srv.url}/api/models/pulls", timeout=30).json()["data"])

    # Pulling again finds it up to date: no file is downloaded twice.
    again = wait(srv, start(srv, REPO)["id"])[-1]
    assert again["status"] == "done"

    # The pulled model serves requests under its repo id...
    r = requests.post(
        f"{srv.base_url}/chat/completions",
        timeout=120,
        json={"model": REPO, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    # ...cannot be deleted while loaded, and can once unloaded.
    url = f"{srv.url}/api/models/{REPO}"
    r = requests.delete(url, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_loaded"
    assert requests.post(f"{srv.url}/api/models/unload", json={"model": REPO}, timeout=60).status_code == 200
    r = requests.delete(url, timeout=30)
    assert r.status_code == 200 and r.json() == {"id": REPO, "object": "model", "deleted": True}
    assert not folder.exists()
    r = requests.delete(url, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert requests.delete(f"{srv.url}/api/models/tiny-default", timeout=30).status_code == 409  # the default


def test_an_interrupted_download_resumes_where_it_stopped(
    srv: Server, stub: HubStub, source: Path, models_dir: Path
) -> None:
    cut = 3 * hub.CHUNK_BYTES  # whole chunks: http_get writes what it has read in whole chunks
    stub.drop_once[("test/tiny-drop", WEIGHTS)] = cut
    last = wait(srv, start(srv, "test/tiny-drop")["id"])[-1]
    assert last["status"] == "done", last
    ranges = [r for _, r in stub.requests_for("test/tiny-drop", WEIGHTS)]
    assert ranges == [None, f"bytes={cut}-"]  # the second request continued, it did not start over
    assert same_files(models_dir / "test--tiny-drop", source)


def test_a_checksum_mismatch_fails_clearly_and_keeps_nothing(srv: Server, stub: HubStub, models_dir: Path) -> None:
    stub.corrupt.add(("test/tiny-corrupt", WEIGHTS))
    last = wait(srv, start(srv, "test/tiny-corrupt")["id"])[-1]
    assert last["status"] == "failed"
    assert f"{WEIGHTS} of test/tiny-corrupt is corrupt: its sha256 is" in last["error"]
    assert not (models_dir / "test--tiny-corrupt").exists()
    assert not list((models_dir / ".pulls" / "test--tiny-corrupt").glob("model*"))
    stub.corrupt.clear()
    assert wait(srv, start(srv, "test/tiny-corrupt")["id"])[-1]["status"] == "done"


def test_cancel_stops_the_pull_and_a_later_pull_continues_it(
    srv: Server, stub: HubStub, source: Path, models_dir: Path
) -> None:
    repo = "test/tiny-slow"
    stub.throttle[(repo, WEIGHTS)] = 4_000_000  # bytes per second: about 3 s for the weights
    pull_id = start(srv, repo)["id"]
    wait(srv, pull_id, until=lambda s: s["bytes_done"] > 2_000_000)
    r = requests.delete(f"{srv.url}/api/models/pulls/{pull_id}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.json()
    assert not (models_dir / "test--tiny-slow").exists()
    partial = next((models_dir / ".pulls" / "test--tiny-slow").glob(f"{WEIGHTS}.*.incomplete"))
    kept = partial.stat().st_size
    assert 0 < kept < (source / WEIGHTS).stat().st_size

    stub.throttle.clear()
    assert wait(srv, start(srv, repo)["id"])[-1]["status"] == "done"
    assert stub.requests_for(repo, WEIGHTS)[-1] == ("GET", f"bytes={kept}-")
    assert same_files(models_dir / "test--tiny-slow", source)


def test_pull_errors_and_unknown_ids(srv: Server) -> None:
    last = wait(srv, start(srv, "test/no-such-model")["id"])[-1]
    assert last["status"] == "failed" and "no model test/no-such-model on http://127.0.0.1:" in last["error"]
    r = requests.post(f"{srv.url}/api/models/pull", json={"model": "not a repo"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = requests.get(f"{srv.url}/api/models/pulls/pull-nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "pull_not_found"
    assert requests.delete(f"{srv.url}/api/models/pulls/pull-nope", timeout=30).status_code == 404
    assert requests.delete(f"{srv.url}/api/models/..%2Fetc", timeout=30).status_code == 404


def test_discover_lists_the_catalogue_and_searches_the_hub(srv: Server, stub: HubStub) -> None:
    body = requests.get(f"{srv.url}/api/models/discover", timeout=30).json()
    assert body["source"] == "catalogue" and body["hub_error"] is None
    ids = {m["id"] for m in body["data"]}
    assert {"mlx-community/Qwen2.5-0.5B-Instruct-4bit", "mlx-community/Llama-3.2-1B-Instruct-4bit"} <= ids
    # Vision-language models are marked (issue 30), and only they.
    vision = {m["id"] for m in body["data"] if m["vision"]}
    assert vision == {"mlx-community/Qwen2-VL-2B-Instruct-4bit", "mlx-community/gemma-3-4b-it-4bit"}
    for model in body["data"]:
        assert model["fits"] == (model["memory_bytes"] <= body["memory_budget_bytes"])
        assert model["quantization"] and model["size_bytes"] > 0
        assert model["format"] == "mlx" and model["compute_dtype"]  # IMPETUS_BACKEND=mlx: no GGUF beside

    found = requests.get(f"{srv.url}/api/models/discover", params={"q": "tiny"}, timeout=30).json()
    assert found["source"] == "hub" and [m["id"] for m in found["data"]] == [REPO]
    tiny = found["data"][0]
    assert tiny["parameters"] > 3_000_000 and tiny["size_bytes"] > 12_000_000 and tiny["fits"] is True
    assert tiny["vision"] is False
    stub.add_repo("mlx-community/seeing-stub", {"config.json": b"{}"}).pipeline_tag = "image-text-to-text"
    seen = requests.get(f"{srv.url}/api/models/discover", params={"q": "seeing"}, timeout=30).json()
    assert [(m["id"], m["vision"]) for m in seen["data"]] == [("mlx-community/seeing-stub", True)]


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"limit": "abc"}, "limit", "invalid_value"),
        ({"limit": "0"}, "limit", "invalid_value"),
        ({"limit": "1000"}, "limit", "invalid_value"),
        ({"q": "x" * 201}, "q", "invalid_value"),
        ({"sort": "downloads"}, "sort", "unknown_parameter"),
    ],
)
def test_discover_query_parameters_are_validated(srv: Server, params: dict[str, str], param: str, code: str) -> None:
    r = requests.get(f"{srv.url}/api/models/discover", params=params, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == code, r.text


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


@pytest.mark.timing
def test_no_hub_fails_fast_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_closed_port()}"
    began = time.monotonic()
    with pytest.raises(hub.HubUnreachable, match=f"^cannot reach the Hugging Face hub at {endpoint}: .*refused"):
        download.pull(REPO, tmp_path, endpoint=endpoint)
    assert time.monotonic() - began < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnreachable, match="HF_HUB_OFFLINE is set"):
        download.pull(REPO, tmp_path, endpoint=endpoint)
    assert not list(tmp_path.iterdir())


def test_discover_falls_back_to_the_catalogue_without_a_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gerdsen_ai_server.app import create_app
    from gerdsen_ai_server.services import services

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_closed_port()}")
    app = create_app({"default_model": "", "models_dir": tmp_path, "memory_budget": 3_000_000_000})
    try:
        body = app.test_client().get("/api/models/discover?q=qwen2.5").get_json()
    finally:
        services(app).engine.shutdown()
    assert body["source"] == "catalogue" and "cannot reach the Hugging Face hub" in body["hub_error"]
    assert body["data"] and all("Qwen2.5" in m["id"] and m["source"] == "catalogue" for m in body["data"])
    fits = {m["id"]: m["fits"] for m in body["data"]}
    assert (
        fits["mlx-community/Qwen2.5-0.5B-Instruct-4bit"] is True
        and fits["mlx-community/Qwen2.5-7B-Instruct-4bit"] is False
    )


@pytest.mark.timing
def test_pull_manager_throttles_progress_events(tmp_path: Path, stub: HubStub) -> None:
    events: list[dict[str, Any]] = []
    bus = EventBus()
    bus.subscribe(lambda kind, payload: events.append(payload) if kind == "pull_progress" else None)
    manager = PullManager(tmp_path, bus, endpoint=stub.url, events_per_second=4)
    stub.throttle[("test/tiny-events", WEIGHTS)] = 8_000_000
    began = time.monotonic()
    state = manager.start("test/tiny-events")
    final = manager.join(state["id"], timeout=60)
    took = time.monotonic() - began
    assert final is not None and final["status"] == "done"
    statuses = [e["status"] for e in events]
    assert statuses[0] == "queued" and statuses[-1] == "done" and "downloading" in statuses
    assert events[-1]["bytes_done"] == events[-1]["bytes_total"] > 0
    assert statuses.count("downloading") <= took * 4 + 2  # the weights alone give 13 progress callbacks
