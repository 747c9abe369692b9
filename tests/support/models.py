"""The embedded default model as the tests use it: converted once into TEST_MODELS_DIR; and the lock that
every file the tests build once into TEST_MODELS_DIR (the GGUFs of tests/support/gguf.py) is built under."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import TEST_MODELS_DIR


def default_model_folder() -> Path:
    """The default model's MLX folder in TEST_MODELS_DIR, converted from the packaged GGUF the first
    time (later calls find it there at once): the tokenizer and weights the tiny test models copy."""
    from gerdsen_ai_server.engine.formats.gguf import ensure_default_model

    return ensure_default_model(TEST_MODELS_DIR)


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Holds ``TEST_MODELS_DIR/.<name>.lock`` (flock) while a cached file is checked and built: the suite
    runs on two pytest-xdist workers, and on a fresh clone both may want the same file at once; without
    it one would load the file the other is still writing (the stamps are written last, so both build)."""
    TEST_MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with (TEST_MODELS_DIR / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
