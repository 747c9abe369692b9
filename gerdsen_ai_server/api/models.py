"""/api/models: local and resident models, load and unload (the registry, over HTTP); warm-up and benchmarks."""

from __future__ import annotations

import math
import time
from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request

from gerdsen_ai_server.api.openai import engine, parse_body
from gerdsen_ai_server.engine.benchmark import BenchmarkFailed, BenchmarkStore, benchmark, warm_up
from gerdsen_ai_server.engine.engine import ContextLengthExceeded, EngineOverloaded
from gerdsen_ai_server.engine.formats.encoder import is_encoder
from gerdsen_ai_server.engine.protocol import EngineGone
from gerdsen_ai_server.engine.registry import ModelBusy, ModelPinned, OverBudget, Resident
from gerdsen_ai_server.schemas.models import (
    BenchmarkHistory,
    BenchmarkRequest,
    LoadRequest,
    ModelInfo,
    ModelsOverview,
    ModelUnloaded,
    UnloadRequest,
)
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, UnsupportedModelFormat
from gerdsen_ai_server.store.paths import confine, model_paths
from gerdsen_ai_server.web.errors import APIError

bp = Blueprint("models", __name__, url_prefix="/api/models")
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
    return model_paths(current_app.config["IMPETUS_SETTINGS"].model_paths)


def load(spec: str, keep_alive: float | None = None) -> Resident:
    """Load (or touch) ``spec`` on the engine thread and wait for it; keep_alive None is the default.

    Every spec that reaches this comes from a request, so it loads untrusted: only a model in the
    models dir or under IMPETUS_MODEL_PATHS, else one uniform 404 (store.paths.confine).
    """
    if keep_alive is not None and keep_alive < 0:
        keep_alive = math.inf  # Ollama's convention: negative keeps the model loaded
    try:
        loaded = engine().load_model(spec, keep_alive=keep_alive, trusted=False,
                                     allowed=allowed_paths()).result(timeout=LOAD_TIMEOUT_S)
    except ModelLoadError as exc:
        raise model_error(exc) from None
    resident = engine().registry.get(loaded.model_id)
    if resident is None:  # evicted between loading and now: vanishingly rare, but say so
        raise APIError(503, f"The model '{spec}' was unloaded again before it could be used.", code="model_evicted")
    return resident


def resident_info(resident: Resident) -> ModelInfo:
    loaded = resident.loaded
    return ModelInfo(
        id=loaded.model_id, state="resident", format="mlx", path=str(loaded.path),
        kind="embedding" if loaded.kind == "embedding" else "language",
        size_bytes=folder_bytes(loaded.path), memory_bytes=loaded.nbytes, context_length=loaded.context_length,
        busy=resident.busy, pinned=resident.pinned,
        keep_alive=None if math.isinf(resident.keep_alive) else resident.keep_alive,
        idle_seconds=round(time.monotonic() - resident.last_used, 3), warmup=resident.warmup,
    )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def local_models() -> list[ModelInfo]:
    """What the models dir holds (pulled folders are named ``org--name`` for ``org/name``)."""
    registry = engine().registry
    found: dict[str, ModelInfo] = {}
    models_dir = Path(registry.models_dir)
    allowed = allowed_paths()
    for path in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
        if path.name.startswith("."):
            continue
        model_id = path.name.replace("--", "/")
        try:
            confine(path.name, models_dir, allowed)  # what a request naming it gets: say so here rather than 404 there
        except ModelNotFound:
            found[model_id] = ModelInfo(id=model_id, state="local", path=str(path), error=(
                "requests cannot load this entry: its name is not a plain model id, or it (or a symlink in it) "
                "leads out of the models dir; list its target in IMPETUS_MODEL_PATHS to allow it"))
            continue
        try:
            fmt = registry.loader.detect(path)
            found[model_id] = ModelInfo(id=model_id, state="local", format=fmt, path=str(path),
                                        kind="embedding" if is_encoder(path) else "language",
                                        size_bytes=folder_bytes(path))
        except ModelLoadError as exc:
            found[model_id] = ModelInfo(id=model_id, state="local", path=str(path), error=str(exc))
    found.setdefault(DEFAULT_MODEL_ID, ModelInfo(id=DEFAULT_MODEL_ID, state="local", format="gguf"))
    return list(found.values())


@bp.get("")
def list_models() -> Response:
    registry = engine().registry
    residents = {r.loaded.model_id: resident_info(r) for r in engine().residents()}
    local = [m for m in local_models() if m.id not in residents]
    overview = ModelsOverview(data=[*residents.values(), *local], memory_budget_bytes=registry.budget_bytes,
                              memory_used_bytes=registry.used_bytes())
    return jsonify(overview.model_dump())


@bp.get("/<path:model_id>")
def get_model(model_id: str) -> Response:
    resident = engine().registry.get(model_id)
    if resident is not None:
        return jsonify(resident_info(resident).model_dump())
    for info in local_models():
        if info.id == model_id:
            return jsonify(info.model_dump())
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


@bp.post("/load")
def load_model() -> Response:
    body = parse_body(LoadRequest)
    resident = load(body.model, body.keep_alive)
    if body.warmup and resident.loaded.kind == "embedding":
        raise APIError(400, f"'{resident.loaded.model_id}' is loaded, but it is an embedding model: warm-up runs "
                       "generation, which it cannot do.", param="warmup", code="model_not_supported")
    if body.warmup and resident.warmup is None:
        with engine_errors(resident.loaded.model_id):
            resident.warmup = warm_up(engine(), resident.loaded)  # a new load starts without one
    return jsonify(resident_info(resident).model_dump())


class engine_errors:  # noqa: N801  (a context manager used like a function)
    """A timed request the engine refused or failed, as HTTP: 503 (overloaded, stopped, model gone) or 400."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, EngineOverloaded):
            raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"}) from None
        if isinstance(exc, ContextLengthExceeded):
            raise APIError(400, str(exc), param="prompt_tokens", code="context_length_exceeded") from None
        if isinstance(exc, (BenchmarkFailed, EngineGone, ModelNotFound)):
            raise APIError(503, f"The run on '{self.model_id}' failed: {exc}", code="benchmark_failed",
                           headers={"Retry-After": "1"}) from None


def benchmark_store() -> BenchmarkStore:
    extensions = current_app.extensions
    if "impetus_benchmarks" not in extensions:
        extensions["impetus_benchmarks"] = BenchmarkStore(Path(engine().registry.models_dir) / ".impetus"
                                                          / "benchmarks.json")
    return extensions["impetus_benchmarks"]


def known_model(model_id: str) -> bool:
    return engine().registry.get(model_id) is not None or any(m.id == model_id for m in local_models())


@bp.post("/<path:model_id>/benchmark")
def run_benchmark(model_id: str) -> Response:
    body = parse_body(BenchmarkRequest) if request.get_data(cache=True) else BenchmarkRequest()
    if not known_model(model_id):
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    store = benchmark_store()
    if not store.claim(model_id):
        raise APIError(409, f"A benchmark of '{model_id}' is already running; wait for it to finish.",
                       param="model", code="benchmark_running")
    try:
        loaded = load(model_id).loaded
        if loaded.kind == "embedding":
            raise APIError(400, f"'{model_id}' is an embedding model; the benchmark measures generation.",
                           param="model", code="model_not_supported")
        with engine_errors(model_id):
            result = benchmark(engine(), loaded, body.prompt_tokens, body.max_tokens)
    finally:
        store.release(model_id)
    store.add(result)
    return jsonify(result.model_dump())


@bp.get("/<path:model_id>/benchmark")
def benchmark_history(model_id: str) -> Response:
    history = benchmark_store().history(model_id)
    if not history and not known_model(model_id):
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return jsonify(BenchmarkHistory(model=model_id, data=history).model_dump())


@bp.post("/unload")
def unload_model() -> Response:
    body = parse_body(UnloadRequest)
    model_id = engine().registry.canonical_id(body.model)
    if engine().registry.get(model_id) is None:
        raise APIError(404, f"The model '{body.model}' is not loaded.", param="model", code="model_not_found")
    try:
        engine().unload_model(model_id).result(timeout=60)
    except ModelLoadError as exc:
        raise model_error(exc) from None
    if model_id == current_app.config["IMPETUS_SETTINGS"].default_model:
        current_app.logger.warning("the default model was unloaded: /health/ready reports not ready")
    return jsonify(ModelUnloaded(id=model_id).model_dump())
