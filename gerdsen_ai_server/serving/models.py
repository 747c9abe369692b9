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
from gerdsen_ai_server.engine.backends.llamacpp_vision import has_projector, located_mmproj
from gerdsen_ai_server.engine.errors import ModelBusy, ModelPinned, OverBudget
from gerdsen_ai_server.engine.formats import adapters
from gerdsen_ai_server.engine.formats.encoder import CrossEncoderModel, is_encoder, is_reranker
from gerdsen_ai_server.engine.formats.vision import is_vision_folder
from gerdsen_ai_server.engine.options import InvalidLoadOption, LoadOptions
from gerdsen_ai_server.engine.registry import Resident
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.models import LoadOptionsInfo, ModelInfo
from gerdsen_ai_server.schemas.openai import ModelCard
from gerdsen_ai_server.schemas.presets import Preset
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.images import has_vision
from gerdsen_ai_server.serving.load_options import check_chat_template
from gerdsen_ai_server.serving.presets import find_preset, load_options, resident_id
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, UnsupportedModelFormat
from gerdsen_ai_server.store.local import REFUSED, folder_bytes, scan
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
    if isinstance(exc, InvalidLoadOption):  # a context length beyond the model's bound, RoPE scaling it lacks
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ModelBusy):
        return APIError(409, str(exc), param="model", code="model_busy")
    if isinstance(exc, ModelPinned):
        return APIError(409, str(exc), param="model", code="model_pinned")
    return APIError(422, str(exc), param="model", code="model_load_failed")


def allowed_paths() -> tuple[Path, ...]:
    """IMPETUS_MODEL_PATHS: the files and folders outside the models dir a request may name."""
    return model_paths(services().settings.model_paths)


def load(spec: str, keep_alive: float | None = None, options: LoadOptions | None = None) -> Resident:
    """Load (or touch) ``spec`` on the engine thread and wait for it; keep_alive None is the default.

    Every spec that reaches this comes from a request, so it loads untrusted: only a model in the
    models dir or under IMPETUS_MODEL_PATHS, else one uniform 404 (store.paths.confine). A preset's
    name given without options (``POST /api/models/load``) loads what the preset serves, as it asks.
    """
    engine = services().engine
    if (options is None or options == LoadOptions()) and (preset := find_preset(spec)) is not None:
        spec, options = preset.model, load_options(preset)
        keep_alive = preset.keep_alive if keep_alive is None else keep_alive
    if keep_alive is not None and keep_alive < 0:
        keep_alive = math.inf  # Ollama's convention: negative keeps the model loaded
    check_chat_template(options.chat_template if options else None)  # a 400 now, not at every chat
    try:
        options = adapters.located(spec, options, engine.registry.models_dir, allowed_paths())  # LoRA: confined
        options = located_mmproj(options, engine.registry.models_dir, allowed_paths())  # a projector: confined
        loaded = engine.load_model(
            spec, keep_alive=keep_alive, trusted=False, allowed=allowed_paths(), options=options
        ).result(timeout=LOAD_TIMEOUT_S)
    except ModelLoadError as exc:
        raise model_error(exc) from None
    resident = engine.registry.get(loaded.model_id)
    if resident is None:  # evicted between loading and now: vanishingly rare, but say so
        raise APIError(503, f"The model '{spec}' was unloaded again before it could be used.", code="model_evicted")
    return resident


def resident_model(
    model_id: str, keep_alive: float | None = None, *, embedding: bool = False, rerank: bool = False
) -> LoadedModel:
    """The resident model, loading a local one on demand when IMPETUS_AUTOLOAD allows.

    A dedicated embedding model is refused (400) unless ``embedding``: it cannot generate text. A
    reranker (a cross-encoder) serves ``rerank`` only, and ``rerank`` takes nothing else.
    """
    loaded = _resident_model(model_id, keep_alive)
    kind = model_kind(loaded)
    if rerank and kind != "rerank":
        raise APIError(
            400,
            f"The model '{model_id}' is not a reranker: /v1/rerank needs a cross-encoder folder "
            "(BERT or XLM-RoBERTa with a one-label sequence-classification head, e.g. bge-reranker).",
            param="model",
            code="model_not_supported",
        )
    if kind == "rerank" and not rerank:
        raise APIError(
            400,
            f"The model '{model_id}' is a reranker: it serves /v1/rerank only, not chat, completions, "
            "messages or embeddings.",
            param="model",
            code="model_not_supported",
        )
    if kind == "embedding" and not embedding:
        raise APIError(
            400,
            f"The model '{model_id}' is an embedding model: it serves /v1/embeddings only, not "
            "chat, completions or messages.",
            param="model",
            code="model_not_supported",
        )
    return loaded


def _resident_model(model_id: str, keep_alive: float | None) -> LoadedModel:
    if (preset := find_preset(model_id)) is not None:
        return _preset_model(preset, keep_alive)
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


def model_kind(loaded: LoadedModel) -> str:
    """'language', 'embedding' or 'rerank': a reranker loads as an encoder (kind 'embedding': no
    generation) whose model is a cross-encoder."""
    return "rerank" if isinstance(loaded.model, CrossEncoderModel) else loaded.kind


def _preset_model(preset: Preset, keep_alive: float | None) -> LoadedModel:
    """The resident serving a preset (serving/presets.py): its own (alias) or its base model's, loaded
    with the preset's options (untrusted, as a request's ``model``) when it is not resident as it asks;
    the preset's keep-alive unless the request gives one."""
    options = load_options(preset)
    resident = services().engine.registry.get(resident_id(preset))
    as_asked = resident is not None and (
        not preset.has_load_options() or resident.options.model_options() == options.model_options()
    )
    if resident is not None and as_asked and keep_alive is None:
        return resident.loaded
    if resident is None and not services().settings.autoload:
        raise APIError(
            404,
            f"The preset '{preset.name}' is not loaded (IMPETUS_AUTOLOAD is off).",
            param="model",
            code="model_not_found",
        )
    try:
        return load(preset.model, preset.keep_alive if keep_alive is None else keep_alive, options).loaded
    except APIError as exc:
        if exc.status == 404:  # the one answer, naming the preset as sent: never the path its file names
            raise APIError(404, str(model_not_found(preset.name)), param="model", code="model_not_found") from None
        raise


def model_card(loaded: LoadedModel, created: int) -> ModelCard:
    """A resident model as /v1/models lists it; an embedding model with what it serves, its pooling and dimensions."""
    card = ModelCard(id=loaded.model_id, created=created, context_length=loaded.context_length)
    if model_kind(loaded) == "rerank":
        card.kind, card.capabilities = "rerank", ["rerank"]
        card.embedding_method = "none: a cross-encoder scores (query, document) pairs"
    elif loaded.kind == "embedding":
        card.kind, card.capabilities = "embedding", ["embeddings"]
        card.embedding_method = loaded.model.pooling.describe()
        card.dimensions = loaded.model.dimensions
        card.matryoshka = loaded.model.matryoshka
    if has_vision(loaded):  # its chat takes images (serving/images.py)
        card.capabilities = [*card.capabilities, "vision"]
    return card


def resident_info(resident: Resident) -> ModelInfo:
    loaded = resident.loaded
    return ModelInfo(
        id=loaded.model_id,
        state="resident",
        format="gguf" if loaded.backend == "llamacpp" else "mlx",
        path=str(loaded.path),
        kind="rerank" if model_kind(loaded) == "rerank" else "embedding" if loaded.kind == "embedding" else "language",
        vision=resident.backend.capabilities.vision,
        size_bytes=folder_bytes(loaded.path),
        memory_bytes=loaded.nbytes,
        compute_dtype=resident.compute.name if resident.compute else None,
        compute_dtype_reason=resident.compute.reason if resident.compute else None,
        context_length=loaded.context_length,
        busy=resident.busy,
        pinned=resident.pinned,
        keep_alive=None if math.isinf(resident.keep_alive) else resident.keep_alive,
        idle_seconds=round(time.monotonic() - resident.last_used, 3),
        warmup=resident.warmup,
        load_options=LoadOptionsInfo(
            context_length=resident.options.context_length,
            rope_scaling=resident.options.rope_scaling,
            chat_template=resident.options.chat_template is not None,
            backend=resident.options.backend,
            alias=resident.options.alias,
            kv_bits=loaded.kv_bits,  # in force
        ),
        preset=resident.options.alias if resident.options.alias and find_preset(resident.options.alias) else None,
        adapter=adapters.shown(resident.options.adapter, services().engine.registry.models_dir),
    )


def local_models() -> list[ModelInfo]:
    """What the models dir holds (pulled folders are named ``org--name`` for ``org/name``), as
    ``impetus list`` scans it; an entry a request could not load (``confine``) says so here rather
    than 404 there, and is not walked."""
    found: dict[str, ModelInfo] = {}
    for entry in scan(Path(services().engine.registry.models_dir), allowed=allowed_paths()):
        if entry.error != REFUSED and adapters.is_adapter(entry.path):  # applied with `adapter`, not loaded alone
            found[entry.id] = ModelInfo(
                id=entry.id, state="local", format=entry.format or "mlx", path=str(entry.path), kind="adapter"
            )
            found[entry.id].size_bytes = entry.size_bytes
        elif entry.error is not None:
            found[entry.id] = ModelInfo(id=entry.id, state="local", path=str(entry.path), error=entry.error)
        else:
            found[entry.id] = ModelInfo(
                id=entry.id,
                state="local",
                format=entry.format,
                path=str(entry.path),
                kind="rerank" if is_reranker(entry.path) else "embedding" if is_encoder(entry.path) else "language",
                # loads as a vision model: mlx-vlm installed, or a GGUF with its projector (llamacpp_vision.py)
                vision=is_vision_folder(entry.path) or has_projector(entry.path, services().settings.backend),
                size_bytes=entry.size_bytes,
            )
    found.setdefault(DEFAULT_MODEL_ID, ModelInfo(id=DEFAULT_MODEL_ID, state="local", format="gguf"))
    return list(found.values())


def known_model(model_id: str) -> bool:
    return services().engine.registry.get(model_id) is not None or any(m.id == model_id for m in local_models())
