"""The embedded default model as the tests use it: converted once into TEST_MODELS_DIR."""

from __future__ import annotations

from pathlib import Path

from tests.support import TEST_MODELS_DIR


def default_model_folder() -> Path:
    """The default model's MLX folder in TEST_MODELS_DIR, converted from the packaged GGUF the first
    time (later calls find it there at once): the tokenizer and weights the tiny test models copy."""
    from gerdsen_ai_server.engine.formats.gguf import ensure_default_model

    return ensure_default_model(TEST_MODELS_DIR)
