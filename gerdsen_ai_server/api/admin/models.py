"""/api/models: local and resident models, load and unload (the registry, over HTTP); warm-up and benchmarks.

The model resolution and the listing are serving/models.py's; the admin scope of every change
here is web/keys.py's, by path, before routing.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from gerdsen_ai_server.engine.benchmark import benchmark, warm_up
from gerdsen_ai_server.engine.errors import BenchmarkFailed, ContextLengthExceeded, EngineGone, EngineOverloaded
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.models import (
    BenchmarkHistory,
    BenchmarkRequest,
    LoadRequest,
    ModelsOverview,
    ModelUnloaded,
    UnloadRequest,
)
from gerdsen_ai_server.services import require, services
from gerdsen_ai_server.serving import load_options
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.models import known_model, load, local_models, model_error, resident_info
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound

bp = Blueprint("models", __name__, url_prefix="/api/models")


@bp.get("")
def list_models() -> Response:
    engine = services().engine
    registry = engine.registry
    residents = {r.loaded.model_id: resident_info(r) for r in engine.residents()}
    local = [m for m in local_models() if m.id not in residents]
    overview = ModelsOverview(
        data=[*residents.values(), *local],
        memory_budget_bytes=registry.budget_bytes,
        memory_used_bytes=registry.used_bytes(),
    )
    return jsonify(overview.model_dump())


@bp.get("/<path:model_id>")
def get_model(model_id: str) -> Response:
    resident = services().engine.registry.get(model_id)
    if resident is not None:
        return jsonify(resident_info(resident).model_dump())
    for info in local_models():
        if info.id == model_id:
            return jsonify(info.model_dump())
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


@bp.post("/load")
def load_model() -> Response:
    body = parse_body(LoadRequest, request.get_data(cache=False))
    resident = load(body.model, body.keep_alive, load_options.from_request(body, adapter=body.adapter))
    if body.warmup and resident.loaded.kind == "embedding":
        raise APIError(
            400,
            f"'{resident.loaded.model_id}' is loaded, but it is an embedding model: warm-up runs "
            "generation, which it cannot do.",
            param="warmup",
            code="model_not_supported",
        )
    if body.warmup and resident.warmup is None:
        with engine_errors(resident.loaded.model_id):
            resident.warmup = warm_up(services().engine, resident.loaded)  # a new load starts without one
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
            raise APIError(
                503,
                f"The run on '{self.model_id}' failed: {exc}",
                code="benchmark_failed",
                headers={"Retry-After": "1"},
            ) from None


@bp.post("/<path:model_id>/benchmark")
def run_benchmark(model_id: str) -> Response:
    data = request.get_data(cache=False)
    body = parse_body(BenchmarkRequest, data) if data else BenchmarkRequest()
    if not known_model(model_id):
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    store = require(services().benchmarks, "benchmarks")
    if not store.claim(model_id):
        raise APIError(
            409,
            f"A benchmark of '{model_id}' is already running; wait for it to finish.",
            param="model",
            code="benchmark_running",
        )
    try:
        loaded = load(model_id).loaded
        if loaded.kind == "embedding":
            raise APIError(
                400,
                f"'{model_id}' is an embedding model; the benchmark measures generation.",
                param="model",
                code="model_not_supported",
            )
        with engine_errors(model_id):
            result = benchmark(services().engine, loaded, body.prompt_tokens, body.max_tokens)
    finally:
        store.release(model_id)
    store.add(result)
    return jsonify(result.model_dump())


@bp.get("/<path:model_id>/benchmark")
def benchmark_history(model_id: str) -> Response:
    history = require(services().benchmarks, "benchmarks").history(model_id)
    if not history and not known_model(model_id):
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return jsonify(BenchmarkHistory(model=model_id, data=history).model_dump())


@bp.post("/unload")
def unload_model() -> Response:
    body = parse_body(UnloadRequest, request.get_data(cache=False))
    engine = services().engine
    model_id = engine.registry.canonical_id(body.model)
    if engine.registry.get(model_id) is None:
        raise APIError(404, f"The model '{body.model}' is not loaded.", param="model", code="model_not_found")
    try:
        engine.unload_model(model_id).result(timeout=60)
    except ModelLoadError as exc:
        raise model_error(exc) from None
    if model_id == services().settings.default_model:
        current_app.logger.warning("the default model was unloaded: /health/ready reports not ready")
    return jsonify(ModelUnloaded(id=model_id).model_dump())
