"""The model a request names: resident, loaded on demand, or refused; and the models dir and the
resident models as /api/models lists them.

Every spec that reaches this comes from a request, so it loads untrusted: only a model in the
models dir or under IMPETUS_MODEL_PATHS, else one uniform 404 (store.paths.confine). The local
listing is store/local.py's ``scan`` (the one that ``impetus list`` prints) seen as a request sees
the models dir: an entry a request could not load says so.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.errors import ModelBusy, ModelPinned, OverBudget
from gerdsen_ai_server.engine.formats.encoder import is_encoder
from gerdsen_ai_server.engine.registry import Resident
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.models import ModelInfo
from gerdsen_ai_server.schemas.openai import ModelCard
from gerdsen_ai_server.services import services
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, UnsupportedModelFormat
from gerdsen_ai_server.store.local import folder_bytes, scan
from gerdsen_ai_server.store.paths import model_not_found, model_paths

LOAD_TIMEOUT_S = 600


def model_error(exc: ModelLoadError) -> APIError:
    """Registry failures as HTTP: missing 404, unconvertible 422, no room 422, busy 409."""
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, UnsupportedModelFormat):
        return APIError(422, str(exc), param="model", code="unsupported_model_format")
    if isinstance(exc, OverBudget):
        return APIError(422, str(exc), param="model", code="insufficient_memory")
    if isinstance(exc, ModelBusy):
        return APIError(409, str(exc), param="model", code="model_busy")
    if isinstance(exc, ModelPinned):
        return APIError(409, str(exc), param="model", code="model_pinned")
    return APIError(422, str(exc), param="model", code="model_load_failed")


def allowed_paths() -> tuple[Path, ...]:
    """IMPETUS_MODEL_PATHS: the files and folders outside the models dir a request may name."""
    return model_paths(services().settings.model_paths)


def load(spec: str, keep_alive: float | None = None) -> Resident:
    """Load (or touch) ``spec`` on the engine thread and wait for it; keep_alive None is the default.

    Every spec that reaches this comes from a request, so it loads untrusted: only a model in the
    models dir or under IMPETUS_MODEL_PATHS, else one uniform 404 (store.paths.confine).
    """
    engine = services().engine
    if keep_alive is not None and keep_alive < 0:
        keep_alive = math.inf  # Ollama's convention: negative keeps the model loaded
    try:
        loaded = engine.load_model(spec, keep_alive=keep_alive, trusted=False, allowed=allowed_paths()).result(
            timeout=LOAD_TIMEOUT_S
        )
    except ModelLoadError as exc:
        raise model_error(exc) from None
    resident = engine.registry.get(loaded.model_id)
    if resident is None:  # evicted between loading and now: vanishingly rare, but say so
        raise APIError(503, f"The model '{spec}' was unloaded again before it could be used.", code="model_evicted")
    return resident


def resident_model(model_id: str, keep_alive: float | None = None, *, embedding: bool = False) -> LoadedModel:
    """The resident model, loading a local one on demand when IMPETUS_AUTOLOAD allows.

    A dedicated embedding model is refused (400) unless ``embedding``: it cannot generate text.
    """
    loaded = _resident_model(model_id, keep_alive)
    if loaded.kind == "embedding" and not embedding:
        raise APIError(
            400,
            f"The model '{model_id}' is an embedding model: it serves /v1/embeddings only, not "
            "chat, completions or messages.",
            param="model",
            code="model_not_supported",
        )
    return loaded


def _resident_model(model_id: str, keep_alive: float | None) -> LoadedModel:
    resident = services().engine.registry.get(model_id)
    if resident is not None and keep_alive is None:
        return resident.loaded
    if resident is None and not services().settings.autoload:
        raise APIError(
            404,
            f"The model '{model_id}' is not loaded (IMPETUS_AUTOLOAD is off).",
            param="model",
            code="model_not_found",
        )
    try:
        return load(model_id, keep_alive).loaded
    except APIError as exc:
        if exc.status == 404:  # one answer for every model that cannot be found (store.paths.model_not_found)
            raise APIError(404, str(model_not_found(model_id)), param="model", code="model_not_found") from None
        raise


def model_card(loaded: LoadedModel, created: int) -> ModelCard:
    """A resident model as /v1/models lists it; an embedding model with what it serves, its pooling and dimensions."""
    card = ModelCard(id=loaded.model_id, created=created, context_length=loaded.context_length)
    if loaded.kind == "embedding":
        card.kind, card.capabilities = "embedding", ["embeddings"]
        card.embedding_method = loaded.model.pooling.describe()
        card.dimensions = loaded.model.dimensions
        card.matryoshka = loaded.model.matryoshka
    return card


def resident_info(resident: Resident) -> ModelInfo:
    loaded = resident.loaded
    return ModelInfo(
        id=loaded.model_id,
        state="resident",
        format="gguf" if loaded.backend == "llamacpp" else "mlx",
        path=str(loaded.path),
        kind="embedding" if loaded.kind == "embedding" else "language",
        size_bytes=folder_bytes(loaded.path),
        memory_bytes=loaded.nbytes,
        context_length=loaded.context_length,
        busy=resident.busy,
        pinned=resident.pinned,
        keep_alive=None if math.isinf(resident.keep_alive) else resident.keep_alive,
        idle_seconds=round(time.monotonic() - resident.last_used, 3),
        warmup=resident.warmup,
    )


def local_models() -> list[ModelInfo]:
    """What the models dir holds (pulled folders are named ``org--name`` for ``org/name``), as
    ``impetus list`` scans it; an entry a request could not load (``confine``) says so here rather
    than 404 there, and is not walked."""
    found: dict[str, ModelInfo] = {}
    for entry in scan(Path(services().engine.registry.models_dir), allowed=allowed_paths()):
        if entry.error is not None:
            found[entry.id] = ModelInfo(id=entry.id, state="local", path=str(entry.path), error=entry.error)
        else:
            found[entry.id] = ModelInfo(
                id=entry.id,
                state="local",
                format=entry.format,
                path=str(entry.path),
                kind="embedding" if is_encoder(entry.path) else "language",
                size_bytes=entry.size_bytes,
            )
    found.setdefault(DEFAULT_MODEL_ID, ModelInfo(id=DEFAULT_MODEL_ID, state="local", format="gguf"))
    return list(found.values())


def known_model(model_id: str) -> bool:
    return services().engine.registry.get(model_id) is not None or any(m.id == model_id for m in local_models())
