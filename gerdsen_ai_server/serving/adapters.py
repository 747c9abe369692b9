"""Per-request LoRA adapters (mlx_lm.server's ``adapters`` field): the model with the adapter as a resident of its own.

mlx_lm.server takes ``adapters`` (a path) per request and reloads its one model with it; we keep
``<model>+<adapter>`` resident beside the base model instead (LoadOptions(adapter, alias)), so
requests for the base and for each adapter batch at the same time, each in its own batch, and no
request waits for a reload. llama.cpp could switch adapters per batch on one context
(``llama_set_adapters_lora``), but that serialises requests with different adapters and breaks
continuous batching; a separate resident is simpler and keeps batching, at the price of a second
copy of the weights (the memory budget counts it, and idle residents are evicted as any other).
"""

from __future__ import annotations

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.formats.adapters import alias
from gerdsen_ai_server.engine.options import LoadOptions
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.models import load, resident_model


def resident_for(model_id: str, adapter: str | None, keep_alive: float | None = None) -> LoadedModel:
    """The resident that serves ``model_id`` with ``adapter`` (a request's ``adapters``): the model
    itself without one; else ``<model>+<adapter>``, loaded on demand when IMPETUS_AUTOLOAD allows
    (an adapter outside the models dir and IMPETUS_MODEL_PATHS is a 404, as a model is)."""
    if adapter is None:
        return resident_model(model_id, keep_alive)
    model_id_with = alias(model_id, adapter)
    resident = services().engine.registry.get(model_id_with)
    if resident is not None and keep_alive is None:
        return resident.loaded
    if resident is None and not services().settings.autoload:
        raise APIError(
            404,
            f"The model '{model_id_with}' is not loaded (IMPETUS_AUTOLOAD is off): load it with "
            'POST /api/models/load {"model", "adapter"}.',
            param="adapters",
            code="model_not_found",
        )
    try:
        loaded = load(model_id, keep_alive, LoadOptions(adapter=adapter, alias=model_id_with)).loaded
    except APIError as exc:
        if exc.message.startswith("The adapter"):  # adapters.adapter_not_found, or one that does not fit
            exc.param = "adapters"
        raise
    if loaded.kind != "language":
        raise APIError(
            400, f"The model '{model_id}' does not generate text.", param="model", code="model_not_supported"
        )
    return loaded
