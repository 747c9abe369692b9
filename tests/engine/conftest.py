"""The in-process engine the engine tests share: the default model on MLX, one engine (one MLX thread)
per module, as several MLX threads in a process is what we avoid. A module with another model
(test_vision_engine.py, test_compute_dtype.py) defines its own ``engine``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR


@pytest.fixture(scope="module")
def engine() -> Iterator[InferenceEngine]:
    eng = InferenceEngine(EngineOptions(TEST_MODELS_DIR, max_batch=8, max_queue=4, backend="mlx"))  # the MLX engine
    eng.start()
    eng.load_model(DEFAULT_MODEL).result(timeout=300)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def model(engine: InferenceEngine) -> LoadedModel:
    return engine.get_model(DEFAULT_MODEL)
