"""Fixtures for the model-loading tests: the embedded default model, converted once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gerdsen_ai_server.engine.formats.gguf import ensure_default_model
from gerdsen_ai_server.store.default_model import default_gguf_path
from tests.support.gguf import Tensors, write_gguf


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def converted_default(models_dir: Path) -> Path:
    """The default model converted into a fresh session folder (about a second)."""
    return ensure_default_model(models_dir)


@pytest.fixture(scope="session")
def default_mlx(converted_default: Path) -> tuple[Any, Any]:
    import mlx_lm

    return mlx_lm.load(str(converted_default))


@pytest.fixture
def make_gguf(tmp_path: Path) -> Callable[[str, dict[str, str], Tensors], Path]:
    """``make_gguf(name, metadata, tensors)``: a minimal GGUF file in this test's folder (tests.support.gguf)."""

    def make(name: str, metadata: dict[str, str], tensors: Tensors) -> Path:
        return write_gguf(tmp_path / name, metadata, tensors)

    return make
