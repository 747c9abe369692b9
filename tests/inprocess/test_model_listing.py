"""GET /api/models and /api/models/<id> in process: the models dir as store/local.py's ``scan`` reads
it (the same scan as ``impetus list``), seen as a request sees it, and the resident models."""

from __future__ import annotations

import os
from pathlib import Path

from flask.testing import FlaskClient

from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.local import folder_bytes
from tests.inprocess.helpers import BERT, LLAMA, error_of, post


def listing(client: FlaskClient) -> dict[str, dict[str, object]]:
    r = client.get("/api/models")
    assert r.status_code == 200, r.get_json()
    return {m["id"]: m for m in r.get_json()["data"]}


def test_the_models_dir_as_listed(client: FlaskClient, models_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link, lock, hidden = models_dir / "leads-out", models_dir / "stale.lock", models_dir / ".staging"
    os.symlink(outside, link)
    lock.write_text("")
    hidden.mkdir()
    try:
        models = listing(client)
    finally:
        link.unlink()
        lock.unlink()
        hidden.rmdir()
    assert "stale.lock" not in models and ".staging" not in models  # not models: locks, hidden entries
    refused = models["leads-out"]
    assert refused["state"] == "local" and refused["size_bytes"] is None and refused["format"] is None
    assert str(refused["error"]).startswith("requests cannot load this entry"), refused
    assert models[BERT]["kind"] == "embedding" and models[LLAMA]["kind"] == "language"
    for model in (LLAMA, BERT):
        if models[model]["state"] == "local":  # another test may have loaded it
            assert models[model]["format"] == "mlx" and models[model]["size_bytes"] == folder_bytes(models_dir / model)
    assert models[DEFAULT_MODEL_ID] == {**models[DEFAULT_MODEL_ID], "state": "local", "format": "gguf"}


def test_a_loaded_model_is_resident(client: FlaskClient, models_dir: Path) -> None:
    r = post(client, "/api/models/load", {"model": LLAMA, "keep_alive": 600})
    info = r.get_json()
    assert r.status_code == 200 and info["state"] == "resident" and info["context_length"] == 512, info
    assert info["format"] == "mlx" and info["memory_bytes"] > 0 and info["keep_alive"] == 600
    assert info["size_bytes"] == folder_bytes(models_dir / LLAMA)
    listed = listing(client)[LLAMA]
    assert {**listed, "idle_seconds": None} == {**info, "idle_seconds": None}
    assert client.get(f"/api/models/{LLAMA}").get_json()["state"] == "resident"
    assert any(m["id"] == LLAMA for m in client.get("/v1/models").get_json()["data"])
    assert client.get(f"/v1/models/{LLAMA}").get_json()["context_length"] == 512


def test_one_local_model_by_id(client: FlaskClient) -> None:
    r = client.get(f"/api/models/{BERT}")
    assert r.status_code == 200 and r.get_json()["id"] == BERT and r.get_json()["kind"] == "embedding"
    r = client.get("/api/models/no-such-model")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def test_warm_up_refuses_an_embedding_model(client: FlaskClient) -> None:
    r = post(client, "/api/models/load", {"model": BERT, "warmup": True})
    assert r.status_code == 400 and error_of(r)["param"] == "warmup", r.get_json()
