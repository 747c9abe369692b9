"""A GGUF LoRA adapter on a llama.cpp model: loaded once with the model and set on its one context.

llama-server's ``--lora FILE`` (scale 1, the GGUF's ``adapter.lora.alpha`` / rank applied by
llama.cpp itself): ``llama_adapter_lora_init`` reads the file against the model (it refuses another
architecture or tensor shapes, and says why in llama.cpp's log, which llamacpp.py forwards to
ours), ``llama_set_adapters_lora`` sets it on the context before the first request. The adapter is
freed with the model (llama.cpp owns it from then on). Switching adapters per batch on one context
is what llama-server's per-request ``lora`` does; we keep one adapter per resident instead
(serving/adapters.py says why).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.store.errors import UnsupportedModelFormat


def apply(loaded: LoadedModel, path: Path, models_dir: Path, scale: float = 1.0) -> LoadedModel:
    """Set the GGUF LoRA at ``path`` on the context of ``loaded`` (a new, idle ``LlamaCppBackend``:
    no request has reached its thread yet), or close the backend and raise UnsupportedModelFormat
    (a 422 naming the adapter as the models dir lists it)."""
    backend = loaded.model
    name = path.relative_to(models_dir).as_posix() if path.is_relative_to(models_dir) else path.name
    lc = backend._lc
    adapter = lc.llama_adapter_lora_init(backend._model, str(path).encode())
    if not adapter:  # a NULL pointer
        backend.close()
        raise UnsupportedModelFormat(
            f"The adapter '{name}' does not fit this model: llama.cpp refused it (another architecture, "
            "or tensors of other shapes; the server log says which)."
        )
    adapters = (lc.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(scale)
    if lc.llama_set_adapters_lora(backend._ctx, adapters, 1, scales) != 0:
        backend.close()
        raise UnsupportedModelFormat(f"The adapter '{name}' could not be set on this model's llama.cpp context.")
    backend.nbytes += path.stat().st_size  # the adapter's tensors, beside the model's
    loaded.nbytes = backend.nbytes
    return loaded
