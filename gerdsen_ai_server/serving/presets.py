"""A request that names a preset: its defaults merged under the request's own, its model loaded with its options.

The conventions: Ollama's Modelfile (``PARAMETER`` values are defaults a request's ``options``
override; ``SYSTEM`` is used when the messages carry no system message; ``TEMPLATE`` replaces the
model's), llama-server's ``--alias`` (the preset's name is the id a client asks for and
/v1/models lists) and LM Studio's load presets (context length, RoPE scaling, backend).

Explicit always wins: a field is the preset's only when the request did not set it at all
(pydantic's ``model_fields_set``), so ``"temperature": 1`` sent as such stays 1 under a preset of
0.2. A preset with load options (``Preset.has_load_options``) is its own resident, under its name
(``LoadOptions.alias``); one with request defaults only is served by its base model's resident, with
no second copy in memory. Presets load untrusted, exactly as a request naming the base model would.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from flask import g, has_app_context

from gerdsen_ai_server.engine.options import LoadOptions
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, ModelCard
from gerdsen_ai_server.schemas.presets import Preset
from gerdsen_ai_server.services import services
from gerdsen_ai_server.store import presets as store

Request = TypeVar("Request", ChatCompletionRequest, CompletionRequest)
SYSTEM_ROLES = ("system", "developer")


def models_dir() -> Path:
    return Path(services().engine.registry.models_dir)


def find_preset(name: str) -> Preset | None:
    """The preset a request's ``model`` names, or None (most requests: a model id is not looked up on disk
    unless it could be a preset's name). Looked up once a request (``g``): a generation asked twice
    (apply_preset, then resident_model), each a few file-system calls that wait for the GIL on a busy server."""
    if not has_app_context():
        return store.find(models_dir(), name)
    found: dict[str, Preset | None] = g.setdefault("impetus_presets", {})
    if name not in found:
        found[name] = store.find(models_dir(), name)
    return found[name]


def load_options(preset: Preset) -> LoadOptions:
    """What the preset asks of the load (engine/options.py); the alias only when it asks anything,
    so a preset of request defaults shares its base model's resident."""
    if not preset.has_load_options():
        return LoadOptions()
    return LoadOptions(
        context_length=preset.context_length or 0,
        rope_scaling=preset.rope_scaling,
        chat_template=preset.chat_template,
        adapter=preset.adapter,
        backend=preset.backend,
        alias=preset.name,
        kv_bits=preset.kv_bits,
    )


def resident_id(preset: Preset) -> str:
    """The id of the resident that serves the preset: its own name, or its base model's id."""
    return preset.name if preset.has_load_options() else preset.model


def merged(request: Request, preset: Preset) -> Request:
    """``request`` with the preset's defaults in every field it did not set; its own values untouched."""
    given = request.model_fields_set
    update = {
        field: value
        for field, value in preset.parameters.model_dump(exclude_none=True).items()
        if field not in given and field in type(request).model_fields
    }
    if isinstance(request, ChatCompletionRequest):
        if preset.system is not None and not any(m.role in SYSTEM_ROLES for m in request.messages):
            update["messages"] = [ChatMessage(role="system", content=preset.system), *request.messages]
        if preset.chat_template_kwargs:
            update["chat_template_kwargs"] = {**preset.chat_template_kwargs, **(request.chat_template_kwargs or {})}
    if not update:
        return request
    # model_copy marks updated fields as set: a later merge (there is none) would see them as explicit.
    return request.model_copy(update=update)


def apply_preset(request: Request) -> Request:
    """The request as its preset would have it sent, when ``request.model`` names a preset; else itself.
    ``model`` stays the preset's name: serving/models.py's ``resident_model`` resolves it."""
    preset = find_preset(request.model)
    return request if preset is None else merged(request, preset)


def preset_cards(created: int) -> list[ModelCard]:
    """Every usable preset as /v1/models lists it (llama-server's ``--alias``, Ollama's ``ollama create``
    name): ``preset: true``, what it serves, and the context length in force when its resident is loaded
    (else the preset's own, or null for the server's default)."""
    return [preset_card(preset, created) for preset in store.list_all(models_dir())[0]]


def preset_card(preset: Preset, created: int) -> ModelCard:
    resident = services().engine.registry.get(resident_id(preset))
    context = resident.loaded.context_length if resident is not None else (preset.context_length or None)
    base = Path(preset.model).name if preset.model.startswith("/") else preset.model  # a path: its name, as ids are
    return ModelCard(id=preset.name, created=created, context_length=context, preset=True, base_model=base)
