"""The engine's errors, in one module.

Model errors (finding, converting, loading) are defined in store/errors.py, beside the model store
that raises most of them, and re-exported here; the rest are the engine's own: capacity, context
length, a stopped engine, the registry's refusals, a cancelled embedding, a failed benchmark.
The modules that raised them before (engine.py, protocol.py, registry.py, embeddings.py,
benchmark.py) import them from here, so their old import paths keep working.
"""

from __future__ import annotations

from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, ModelRefused, UnsupportedModelFormat

__all__ = [
    "BenchmarkFailed",
    "ContextLengthExceeded",
    "EmbeddingCancelled",
    "EngineGone",
    "EngineOverloaded",
    "ModelBusy",
    "ModelLoadError",
    "ModelNotFound",
    "ModelPinned",
    "ModelRefused",
    "OverBudget",
    "UnsupportedModelFormat",
]


class EngineOverloaded(RuntimeError):
    """More requests in flight than the engine accepts; the caller should retry later."""


class ContextLengthExceeded(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens."
        )


class EngineGone(RuntimeError):
    """The engine thread stopped while a request was waiting on it."""


class ModelBusy(ModelLoadError):
    """The model is generating and cannot be unloaded now."""


class ModelPinned(ModelLoadError):
    """The model is the server's default, pinned so the server stays ready: never unloaded on request."""


class OverBudget(ModelLoadError):
    """The model does not fit the memory budget even after evicting every idle model."""


class EmbeddingCancelled(RuntimeError):
    """The caller gave up on the embeddings (it left, timed out, or an operator cancelled it)."""


class BenchmarkFailed(RuntimeError):
    """The engine failed the timed request (the model was unloaded under it, or the engine stopped)."""
