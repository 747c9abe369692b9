"""Settings reach the engine's loaders and the llama.cpp backend as they were given to
``create_app({...})``: nothing under engine/ reads the environment (engine/options.py).

Before, the loaders and the llama.cpp backend read ``Settings()`` from the environment themselves,
so an override in ``create_app``'s mapping never reached them: here the environment says the
opposite of the mapping, and the mapping must win."""

from __future__ import annotations

from pathlib import Path

import pytest

from gerdsen_ai_server.app import create_app
from gerdsen_ai_server.engine.backends import llamacpp_sizing
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.engine.options import BackendOptions
from gerdsen_ai_server.services import services
from gerdsen_ai_server.store.default_model import default_gguf_path


def test_create_app_overrides_reach_the_loader_not_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMPETUS_BACKEND", "llamacpp")  # what the environment says: run GGUFs on llama.cpp
    monkeypatch.setenv("IMPETUS_MAX_BATCH", "7")
    models = tmp_path / "models"
    models.mkdir()
    gguf = tmp_path / "user-model.gguf"
    gguf.symlink_to(default_gguf_path())
    app = create_app(
        {
            "default_model": "",
            "models_dir": models,
            "backend": "mlx",
            "max_batch": 3,
            "llamacpp_threads": 1,
            "log_level": "warning",
        }
    )
    engine = services(app).engine
    try:
        loader = engine.registry.loader
        assert loader.options == BackendOptions(backend="mlx", sequences=3, llamacpp_threads=1)
        # IMPETUS_BACKEND=llamacpp in the environment would run the GGUF as is; the mapping's mlx converts it.
        resolved = loader.resolve(str(gguf), models, trusted=True)  # as the operator's --model names it
        assert resolved.is_dir() and loader.detect(resolved) == "mlx"
        # The llama.cpp sizing of a GGUF counts the mapping's max_batch sequences of KV cache, not the environment's 7.
        meta = read_gguf_header(gguf).metadata
        assert loader.estimate_bytes(gguf, None) == gguf.stat().st_size + llamacpp_sizing.kv_bytes(meta, 3)
    finally:
        engine.shutdown()
