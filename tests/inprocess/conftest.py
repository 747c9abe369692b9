"""The in-process tier: the app under Flask's test client, no Gunicorn, no sockets.

One real ``InferenceEngine`` per session (built from the settings as ``create_app`` builds its own,
``app.build_engine``, but without ``create_app``'s SIGTERM on an engine crash), started once over a models dir of two tiny random-weight models the tests make themselves
(tests/support/tiny_models.py): ``tiny-llama`` (a 2-layer llama with SmolLM2's real tokenizer and chat
template, 512-token context) and ``tiny-bert`` (a BERT embedding model, 32 dimensions). Requests
load them on demand (IMPETUS_AUTOLOAD) as they would on the real server. Nothing is mocked: a
request that must fail before the engine fails there, and one that reaches it runs on it.

Each test app is ``create_app(settings, engine=engine)``: it shares the session's engine, never
starts, stops or loads into it, so several apps (with keys, with small limits) cost milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gerdsen_ai_server.app import build_engine, create_app
from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.formats.gguf import ensure_default_model
from tests.inprocess.helpers import BERT, LLAMA
from tests.support import TEST_MODELS_DIR
from tests.support.tiny_models import build_tiny_bert, build_tiny_llama

BASE: dict[str, Any] = {
    "default_model": "",
    "backend": "mlx",  # the MLX engine, as the real suite runs it (tests/support/server.py)
    "log_level": "warning",
    "max_batch": 4,
    "max_queue": 4,
    "max_tokens_default": 8,
    "max_tokens_limit": 400,
    "max_request_tokens": 1000,
    "prompt_cache_bytes": 0,
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inprocess-models")
    # The default model's converted folder (cached in build/test-models) lends its tokenizer.
    build_tiny_llama(folder / LLAMA, ensure_default_model(TEST_MODELS_DIR))
    build_tiny_bert(folder / BERT)
    return folder


@pytest.fixture(scope="session")
def settings(models_dir: Path) -> dict[str, Any]:
    return {**BASE, "models_dir": str(models_dir)}


@pytest.fixture(scope="session")
def engine(settings: dict[str, Any]) -> Iterator[InferenceEngine]:
    started = build_engine(Settings.from_mapping(settings))
    started.start()
    yield started
    started.shutdown()


@pytest.fixture(scope="session")
def make_app(settings: dict[str, Any], engine: InferenceEngine) -> Callable[..., Flask]:
    """An app over the session's engine, with these settings changed."""

    def make(**overrides: Any) -> Flask:
        app = create_app({**settings, **overrides}, engine=engine)
        app.testing = True
        return app

    return make


@pytest.fixture(scope="session")
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
