"""/api/models: pull from the Hugging Face hub (background, with progress), delete, discover.

    POST   /api/models/pull            {"model": "org/name"} -> 202 and the pull's state; 429 beyond
                                       IMPETUS_MAX_PULLS queued or downloading
    GET    /api/models/pulls           every pull this process knows
    GET    /api/models/pulls/<id>      one pull's state (bytes_done / bytes_total, status)
    DELETE /api/models/pulls/<id>      cancel it (partial files stay: pulling again continues them)
    DELETE /api/models/<model id>      delete a local model; 409 while it is loaded
    GET    /api/models/discover?q=     curated catalogue, or a live hub search, each flagged ``fits``;
                                       the search gives up after IMPETUS_HUB_SEARCH_TIMEOUT, and at most
                                       HUB_SEARCHES run at once: otherwise the catalogue, with hub_error

Progress also goes out as ``pull_progress`` events on the engine's event bus.
"""

from __future__ import annotations

import threading
from pathlib import Path

from flask import Blueprint, Flask, Response, jsonify, request
from huggingface_hub import ModelInfo

from gerdsen_ai_server.schemas.pulls import (
    DiscoveredModel,
    DiscoverQuery,
    DiscoverResponse,
    ModelDeleted,
    PullList,
    PullRequest,
    PullStatus,
)
from gerdsen_ai_server.services import require, services
from gerdsen_ai_server.serving import discover as cards
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.store import catalogue, hub
from gerdsen_ai_server.store import local as local_models
from gerdsen_ai_server.store.errors import ModelNotFound
from gerdsen_ai_server.store.pulls import PullManager, PullQueueFull
from gerdsen_ai_server.web.errors import APIError

bp = Blueprint("pulls", __name__, url_prefix="/api/models")
# Hub searches running at once: each holds a request thread for up to IMPETUS_HUB_SEARCH_TIMEOUT, so a
# burst of searches against a slow hub must not take every Gunicorn thread (probes included).
HUB_SEARCHES = 4
PULL_RETRY_AFTER_S = 30


def init_pulls(app: Flask) -> None:
    """The PullManager (after the engine: pulls publish on its event bus) and the hub-search slots,
    into ``services().pulls`` and ``.hub_search_slots``; app.py registers ``bp``."""
    found = services(app)
    settings = found.settings
    found.pulls = PullManager(Path(settings.models_dir), found.engine.events, max_pulls=settings.max_pulls)
    found.hub_search_slots = threading.BoundedSemaphore(HUB_SEARCHES)


def pulls() -> PullManager:
    return require(services().pulls, "pulls")


def _status(state: dict) -> dict:
    return PullStatus.model_validate(state).model_dump()


@bp.post("/pull")
def start_pull() -> tuple[Response, int]:
    body = parse_body(PullRequest, request.get_data(cache=False))
    try:
        state = pulls().start(body.model, revision=body.revision, gguf=body.gguf)
    except PullQueueFull as exc:
        raise APIError(429, str(exc), code="too_many_pulls", headers={"Retry-After": str(PULL_RETRY_AFTER_S)}) from None
    except hub.PullError as exc:
        raise APIError(400, str(exc), param="model", code="invalid_value") from None
    response = jsonify(_status(state))
    response.headers["Location"] = f"{bp.url_prefix}/pulls/{state['id']}"
    return response, 202


@bp.get("/pulls")
def list_pulls() -> Response:
    return jsonify(PullList.model_validate({"data": pulls().list()}).model_dump())


def _pull_or_404(state: dict | None, pull_id: str) -> dict:
    if state is None:
        raise APIError(404, f"No pull with id '{pull_id}'.", param="id", code="pull_not_found")
    return state


@bp.get("/pulls/<pull_id>")
def get_pull(pull_id: str) -> Response:
    return jsonify(_status(_pull_or_404(pulls().get(pull_id), pull_id)))


@bp.delete("/pulls/<pull_id>")
def cancel_pull(pull_id: str) -> Response:
    return jsonify(_status(_pull_or_404(pulls().cancel(pull_id), pull_id)))


@bp.delete("/<path:model_id>")
def delete_model(model_id: str) -> Response:
    models_dir = Path(services().settings.models_dir)
    try:
        path = local_models.find(models_dir, model_id)
    except ModelNotFound:
        raise APIError(
            404, f"The model '{model_id}' is not in the models dir.", param="model", code="model_not_found"
        ) from None
    resolved = path.resolve()
    loaded = [
        r
        for r in services().engine.residents()
        if r.loaded.model_id == model_id
        or r.loaded.path.resolve() == resolved
        or resolved in r.loaded.path.resolve().parents
    ]
    if any(r.pinned for r in loaded) or model_id == services().settings.default_model:
        raise APIError(
            409,
            f"The model '{model_id}' is the server's default model (IMPETUS_DEFAULT_MODEL), pinned "
            "so that the server stays ready: it cannot be deleted while the server runs.",
            param="model",
            code="model_pinned",
        )
    if loaded:
        raise APIError(
            409,
            f"The model '{model_id}' is loaded; unload it first (POST /api/models/unload).",
            param="model",
            code="model_loaded",
        )
    if local_models.model_id(path) in pulls().active_repos():
        raise APIError(
            409,
            f"The model '{model_id}' is being pulled; cancel the pull first.",
            param="model",
            code="pull_in_progress",
        )
    local_models.remove(models_dir, model_id)
    services().engine.events.publish("model_event", event="deleted", model=model_id)
    return jsonify(ModelDeleted(id=model_id).model_dump())


@bp.get("/discover")
def discover() -> Response:
    params = DiscoverQuery.model_validate(request.args.to_dict())  # a bad one: 400 naming it
    query, author, limit = params.q.strip() or None, params.author or None, params.limit
    registry = services().engine.registry
    budget = registry.budget_bytes
    settings = services().settings
    models_dir = Path(settings.models_dir)
    hub_error = None
    slots = require(services().hub_search_slots, "hub_search_slots")
    if query and not slots.acquire(blocking=False):
        hub_error = f"{HUB_SEARCHES} hub searches are already running; this answer is from the catalogue"
    elif query:
        try:
            found = hub.search(query, author=author, limit=limit, timeout=settings.hub_search_timeout)
        except hub.PullError as exc:
            hub_error = str(exc)
        finally:
            slots.release()
        if hub_error is None:
            data = [_hub_entry(info, budget, models_dir) for info in found if _valid_repo_id(info.id)]
            return _discovered("hub", query, budget, data, None)
    return _discovered("catalogue", query, budget, cards.catalogue_cards(query, limit, models_dir), hub_error)


def _valid_repo_id(repo_id: str) -> bool:
    """A hub's answer names folders below (``local``): an id that is not a repo id is left out."""
    try:
        hub.check_repo_id(repo_id)
    except hub.PullError:
        return False
    return True


def _hub_entry(info: ModelInfo, budget: int, models_dir: Path) -> DiscoveredModel:
    repo_id = info.id
    summary = info.safetensors
    parameters, size = catalogue.from_safetensors_info(repo_id, summary.parameters if summary else None)
    curated = next((m for m in catalogue.CATALOGUE if m.id == repo_id), None)
    kv, trained = (curated.kv_elements, curated.context) if curated else (0, 0)  # a hub card: no KV known
    quantized = (catalogue.quantization_from_name(repo_id) or "").endswith("bit")
    memory, choice = cards.mlx_memory(parameters, size, kv, trained, quantized)
    return DiscoveredModel(
        id=repo_id,
        source="hub",
        description=curated.description if curated else None,
        parameters=parameters,
        quantization=catalogue.quantization_from_name(repo_id),
        size_bytes=size,
        memory_bytes=memory,
        fits=None if memory is None else memory <= budget,
        downloads=info.downloads,
        local=(models_dir / hub.folder_name(repo_id)).is_dir(),
        backend="mlx",
        compute_dtype=choice.name,
        memory_note=f"the weights, computing in {choice.name} ({choice.reason})",
        # The hub's task tag for vision-language models (mlx-vlm's conversions carry it)
        vision=info.pipeline_tag == "image-text-to-text" or "image-text-to-text" in (info.tags or []),
    )


def _discovered(
    source: str, query: str | None, budget: int, data: list[DiscoveredModel], hub_error: str | None
) -> Response:
    body = DiscoverResponse.model_validate(
        {"source": source, "query": query, "memory_budget_bytes": budget, "hub_error": hub_error, "data": data}
    )
    return jsonify(body.model_dump())
