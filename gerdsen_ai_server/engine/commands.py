"""What a caller's thread asks of the engine thread: one typed command per kind of work.

Callers put a command on the engine's queue (``InferenceEngine.load_model``, ``submit`` ...) and
wait on its future or its stream; the engine thread handles them between steps, in order.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.embeddings import EmbeddingJob
from gerdsen_ai_server.engine.options import LoadOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenStream


@dataclass(frozen=True)
class Load:
    """Load ``spec`` (or join its load, or touch it when resident); ``reply`` gets the model."""

    spec: str
    keep_alive: float | None  # idle seconds; None: the server default; inf: keep
    pinned: bool
    trusted: bool  # the operator's own spec (may name any path); a request's never is
    allowed: tuple[Path, ...]  # IMPETUS_MODEL_PATHS a request's spec may resolve under
    reply: Future[LoadedModel]
    options: LoadOptions = LoadOptions()  # context length, template, adapter, backend, alias


@dataclass(frozen=True)
class Unload:
    model_id: str
    reply: Future[None]


@dataclass(frozen=True)
class Submit:
    """A generation for an engine-stepped backend: held for its burst, then admitted (admission.py)."""

    request: GenerationRequest
    stream: TokenStream


@dataclass(frozen=True)
class Embed:
    job: EmbeddingJob


@dataclass(frozen=True)
class BatchLimit:
    """Decode at most ``limit`` sequences per step (None: max_batch), from the next loop turn."""

    limit: int | None


@dataclass(frozen=True)
class Wake:
    """Nothing to do: wakes a waiting engine thread (shutdown)."""


Command = Load | Unload | Submit | Embed | BatchLimit | Wake
