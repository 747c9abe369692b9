"""Pulls and hub searches that a hostile or stalled hub cannot turn against the server (issue 23, items 2 and 8).

A real server (no model: nothing here needs one) whose HF_ENDPOINT is the stand-in hub of
tests/support/hub_stub.py, which can list hostile file names, say nothing (``hold``) or trickle its answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from gerdsen_ai_server.store import download, hub
from gerdsen_ai_server.store.pulls import PullManager
from tests.support.hub_stub import HubStub
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

MAX_PULLS = 3
SEARCH_TIMEOUT = 2.0
# Enough of a model for a pull to pick it (weights and a config); nothing here loads it.
MODEL_FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 4096}
HOSTILE = {
    "../escape": "'..' path segment",
    "/abs": "an absolute path",
    "a\\b": "the character '\\\\'",
    ".hidden.json": "hidden files",
    ".impetus-pull.json": "hidden files",
    "sub/../../escape.json": "'..' path segment",
    "tokenizer\x1b[2J.json": "the character '\\x1b'",
    "weights\u202esnoj.json": "the character '\\u202e'",
}


@pytest.fixture(scope="module")
def stub() -> Iterator[HubStub]:
    stub = HubStub().start()
    for n, name in enumerate(HOSTILE):
        stub.add_repo(f"test/odd-{n}", {**MODEL_FILES, name: b"{}"})
    stub.add_repo("test/odd-all", {**MODEL_FILES, **{name: b"{}" for name in ("../escape", "/abs", "a\\b", ".hidden")}})
    stub.add_repo(
        "test/with-git-files", {**MODEL_FILES, ".gitattributes": b"*.safetensors filter=lfs\n", ".hidden": b"x"}
    )
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outer") / "models"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, stub: HubStub, models_dir: Path) -> Iterator[Server]:
    models_dir.mkdir()
    server = start_server(
        tmp_path_factory.mktemp("safe-pulls"),
        wait_ready=False,
        IMPETUS_DEFAULT_MODEL="",
        IMPETUS_MODELS_DIR=str(models_dir),
        IMPETUS_MAX_PULLS=str(MAX_PULLS),
        IMPETUS_HUB_SEARCH_TIMEOUT=str(SEARCH_TIMEOUT),
        HF_ENDPOINT=stub.url,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
    )
    yield server
    stop_server(server, wait=False)


def post_pull(srv: Server, repo: str) -> requests.Response:
    return requests.post(f"{srv.url}/api/models/pull", json={"model": repo}, timeout=30)


def finish(srv: Server, pull_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = requests.get(f"{srv.url}/api/models/pulls/{pull_id}", timeout=30).json()
        if state["status"] in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"pull {pull_id} did not finish in {timeout} s")


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("repo", [*(f"test/odd-{n}" for n in range(len(HOSTILE))), "test/odd-all"])
def test_a_pull_refuses_hidden_and_odd_file_names(srv: Server, models_dir: Path, repo: str) -> None:
    outer = models_dir.parent
    before = everything_under(outer)
    r = post_pull(srv, repo)
    assert r.status_code == 202, r.text
    state = finish(srv, r.json()["id"])
    assert state["status"] == "failed", state
    assert "refusing to pull it" in state["error"] and repo in state["error"]
    if repo != "test/odd-all":
        name = list(HOSTILE)[int(repo.rsplit("-", 1)[1])]
        assert HOSTILE[name] in state["error"], state["error"]
    assert everything_under(outer) == before  # nothing written, in the models dir or beside it
    assert not Path("/abs").exists()


def test_hidden_git_files_are_never_pulled_but_do_not_stop_a_pull(srv: Server, models_dir: Path) -> None:
    state = finish(srv, post_pull(srv, "test/with-git-files").json()["id"])
    assert state["status"] == "done", state
    folder = models_dir / "test--with-git-files"
    assert sorted(p.name for p in folder.iterdir()) == [".impetus-pull.json", "config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "repo", ["org/.hidden", "a--b/c", "org/name-", "org/name.", ".org/name", "org/..x", "org/" + "n" * 97]
)
def test_repo_ids_that_are_not_the_hubs_are_refused(srv: Server, repo: str) -> None:
    r = post_pull(srv, repo)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


@pytest.mark.parametrize("repo", ["org/name\n", "org/name\x00", "org/na\u202eme", "org/a/b", "org\\x/name"])
def test_check_repo_id_matches_the_whole_id(repo: str) -> None:
    with pytest.raises(hub.PullError, match="is not a Hugging Face repo id"):
        hub.check_repo_id(repo)


def test_a_pull_writes_nothing_through_a_link_out_of_the_models_dir(tmp_path: Path, stub: HubStub) -> None:
    stub.add_repo("test/linked", MODEL_FILES)
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (models / ".pulls").symlink_to(outside)  # the staging folder leads out
    with pytest.raises(hub.UnsafeName, match="link or leads outside"):
        download.pull("test/linked", models, endpoint=stub.url)
    (models / ".pulls").unlink()
    (models / "test--linked").symlink_to(outside)  # the model's own folder leads out
    with pytest.raises(hub.UnsafeName, match="link or leads outside"):
        download.pull("test/linked", models, endpoint=stub.url)
    assert not list(outside.iterdir())
    assert (models / "test--linked").is_symlink()  # left as it was, not replaced
    assert sorted(p.name for p in models.iterdir()) == ["test--linked"]


def test_pulls_beyond_the_bound_get_429_and_a_cancel_frees_a_place(srv: Server, stub: HubStub) -> None:
    stub.hold("/api/models/stalled/")  # the hub accepts these pulls and then says nothing
    try:
        ids = []
        for n in range(MAX_PULLS):
            r = post_pull(srv, f"stalled/r{n}")
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        assert post_pull(srv, "stalled/r0").json()["id"] == ids[0]  # the same repo joins its pull: no new place
        for n in range(MAX_PULLS, MAX_PULLS + 5):
            r = post_pull(srv, f"stalled/r{n}")
            assert r.status_code == 429, r.text
            error = r.json()["error"]
            assert error["code"] == "too_many_pulls" and f"IMPETUS_MAX_PULLS={MAX_PULLS}" in error["message"]
            assert int(r.headers["Retry-After"]) > 0
        # Two download at a time: the third is queued, and cancelling it frees its place at once.
        states = {s["id"]: s["status"] for s in requests.get(f"{srv.url}/api/models/pulls", timeout=30).json()["data"]}
        queued = [i for i in ids if states[i] == "queued"]
        assert len(queued) == MAX_PULLS - 2, states
        r = requests.delete(f"{srv.url}/api/models/pulls/{queued[0]}", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert post_pull(srv, "stalled/again").status_code == 202
    finally:
        stub.release()  # the hub answers again (no such repos): every pull ends
    listed = requests.get(f"{srv.url}/api/models/pulls", timeout=30).json()["data"]
    for state in listed:
        assert finish(srv, state["id"])["status"] in ("failed", "cancelled", "done")


def test_queued_pulls_hold_no_thread(tmp_path: Path, stub: HubStub) -> None:
    manager = PullManager(tmp_path, endpoint=stub.url)
    stub.hold("/api/models/stalled-threads/")
    before = set(threading.enumerate())
    try:
        started = [manager.start(f"stalled-threads/r{n}") for n in range(12)]
        time.sleep(0.3)
        new = [t for t in threading.enumerate() if t not in before and "process_request_thread" not in t.name]
        assert len(new) <= 2, [t.name for t in new]  # the two download slots, not one thread per pull
        assert sum(s["status"] == "queued" for s in manager.list()) >= 10
    finally:
        stub.release()
    for state in started:
        assert manager.join(state["id"], timeout=30)["status"] == "failed"  # type: ignore[index]
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t not in before and "process_request_thread" not in t.name]


@pytest.mark.timing
def test_discover_answers_in_time_when_the_hub_stalls(srv: Server, stub: HubStub) -> None:
    stub.hold("search=stalled")
    try:
        began = time.monotonic()
        r = requests.get(f"{srv.url}/api/models/discover", params={"q": "stalled"}, timeout=30)
        took = time.monotonic() - began
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["source"] == "catalogue"
        assert f"did not answer within {SEARCH_TIMEOUT:g} s" in body["hub_error"]
        assert SEARCH_TIMEOUT * 0.9 < took < SEARCH_TIMEOUT + 3, took

        # A burst of searches holds at most HUB_SEARCHES request threads; the rest answer at once.
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: requests.get(
                        f"{srv.url}/api/models/discover", params={"q": "stalled"}, timeout=30
                    ).json(),
                    range(8),
                )
            )
        errors = [a["hub_error"] for a in answers]
        assert all(a["source"] == "catalogue" for a in answers)
        assert sum("already running" in e for e in errors) >= 3, errors
        assert sum("did not answer" in e for e in errors) <= 4, errors
    finally:
        stub.release()


@pytest.mark.timing
def test_search_gives_up_on_a_hub_that_trickles(stub: HubStub) -> None:
    stub.trickle["search=trickle"] = 0.2  # a byte every 0.2 s: no read ever times out
    try:
        began = time.monotonic()
        with pytest.raises(hub.HubTimeout, match="did not answer within 1 s"):
            hub.search("trickle", endpoint=stub.url, timeout=1.0)
        assert time.monotonic() - began < 2.5
    finally:
        stub.trickle.clear()
