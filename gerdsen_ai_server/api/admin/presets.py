"""/api/presets: list, read, create, replace and delete presets (store/presets.py's files, over HTTP).

Every write is admin (web/keys.py decides by path, before routing); a name is checked before any
path is made from it, and a preset's ``model`` and ``adapter`` are held to a request's rules.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.presets import Preset, PresetDeleted, PresetList
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.body import parse_body
from gerdsen_ai_server.serving.load_options import check_chat_template
from gerdsen_ai_server.serving.models import allowed_paths
from gerdsen_ai_server.serving.presets import models_dir
from gerdsen_ai_server.store import presets as store

bp = Blueprint("presets", __name__, url_prefix="/api/presets")


def _error(exc: store.PresetError) -> APIError:
    if isinstance(exc, store.PresetNotFound):
        return APIError(404, str(exc), param="name", code="preset_not_found")
    return APIError(400, str(exc), param=exc.param, code="invalid_preset")


def _name(name: str) -> str:
    try:
        return store.check_name(name)
    except store.PresetError as exc:
        raise _error(exc) from None


def _save(preset: Preset, *, create: bool) -> Preset:
    """Check and write ``preset``: 400 when it names a model or adapter a request could not, 409 when
    its name is a model's (``preset_conflict``) or, creating, already a preset's (``preset_exists``)."""
    check_chat_template(preset.chat_template)  # a 400 now, not at its first load
    try:
        store.check(preset, allowed_paths())
        resident = services().engine.registry.get(preset.name)
        if store.model_named(models_dir(), preset.name) or (resident and resident.options.alias != preset.name):
            raise APIError(
                409,
                f"'{preset.name}' is already a model's id; a preset of that name would hide it. Choose another name.",
                param="name",
                code="preset_conflict",
            )
        if create and store.exists(models_dir(), preset.name):
            raise APIError(
                409,
                f"There is a preset '{preset.name}' already; PUT /api/presets/{preset.name} replaces it.",
                param="name",
                code="preset_exists",
            )
        store.write(models_dir(), preset)
    except store.PresetError as exc:
        raise _error(exc) from None
    return preset


@bp.get("")
def list_presets() -> Response:
    try:
        found, _broken = store.list_all(models_dir())  # a broken file is logged, and listed by `impetus preset list`
    except store.PresetError as exc:
        raise _error(exc) from None
    return jsonify(PresetList(presets=found).model_dump(mode="json"))


@bp.get("/<path:name>")
def get_preset(name: str) -> Response:
    try:
        preset = store.read(models_dir(), _name(name))
    except store.PresetError as exc:
        raise _error(exc) from None
    return jsonify(preset.model_dump(mode="json"))


@bp.post("")
def create_preset() -> tuple[Response, int]:
    preset = parse_body(Preset, request.get_data(cache=False))
    return jsonify(_save(preset, create=True).model_dump(mode="json")), 201


@bp.put("/<path:name>")
def replace_preset(name: str) -> Response:
    name = _name(name)
    preset = parse_body(Preset, request.get_data(cache=False))
    if preset.name != name:
        raise APIError(
            400, f"The body's name '{preset.name}' is not the path's '{name}'.", param="name", code="invalid_preset"
        )
    return jsonify(_save(preset, create=False).model_dump(mode="json"))


@bp.delete("/<path:name>")
def delete_preset(name: str) -> Response:
    try:
        store.delete(models_dir(), _name(name))
    except store.PresetError as exc:
        raise _error(exc) from None
    return jsonify(PresetDeleted(name=name).model_dump())
