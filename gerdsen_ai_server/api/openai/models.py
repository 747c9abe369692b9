"""GET /v1/models and /v1/models/<id>: the resident models, as OpenAI lists them (with what an
embedding model serves, its pooling and its dimensions), and the presets, as aliases (``preset: true``)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ModelList
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.models import model_card
from gerdsen_ai_server.serving.presets import find_preset, preset_card, preset_cards

bp = Blueprint("openai_models", __name__, url_prefix="/v1")


@bp.get("/models")
def list_models() -> Response:
    engine = services().engine
    created = int(engine.started_at)
    presets = preset_cards(created)  # aliases (serving/presets.py): a preset's own resident is listed once, as it
    named = {card.id for card in presets}
    residents = [model_card(m, created) for m in engine.models() if m.model_id not in named]
    return jsonify(ModelList(data=[*residents, *presets]).model_dump())


@bp.get("/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    engine = services().engine
    if (preset := find_preset(model_id)) is not None:
        return jsonify(preset_card(preset, int(engine.started_at)).model_dump())
    resident = engine.registry.get(model_id)
    if resident is None:
        raise APIError(
            404, f"The model '{model_id}' does not exist or is not loaded.", param="model", code="model_not_found"
        )
    return jsonify(model_card(resident.loaded, int(engine.started_at)).model_dump())
