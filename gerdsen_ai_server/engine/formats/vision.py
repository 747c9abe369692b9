"""Vision-language model folders: told apart by their config.json (a ``vision_config`` of a family
mlx-vlm knows) and loaded with mlx-vlm, the optional ``impetus[vision]`` extra.

Without mlx-vlm installed such a folder loads as before, through mlx-lm (text only, where mlx-lm
knows the family). The loaded model's ``LoadedModel.model`` is its running ``VisionBackend``, as a
llama.cpp model's is its backend: the engine opens it as it is (engine.py ``_open_backend``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.errors import ModelLoadError
from gerdsen_ai_server.engine.formats.safetensors import context_length, parameter_nbytes, tokenizer_bytes
from gerdsen_ai_server.engine.options import InvalidLoadOption

log = logging.getLogger(__name__)

BACKEND = "mlx-vlm"  # LoadedModel.backend of a vision model

# Families whose every decode step needs more than the KV cache and the rope offsets (cross-attention
# states, an encoder's outputs): the batch (backends/vision_batch.py) does not carry those, as
# mlx-vlm's own BatchGenerator does not, so they are refused at load rather than answered wrongly.
UNBATCHABLE = {"mllama", "florence2", "nemotron_parse"}


def available() -> bool:
    """Whether mlx-vlm (``make setup`` installs it: requirements-vision.txt) is importable."""
    return importlib.util.find_spec("mlx_vlm") is not None


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_vision_folder(path: Path) -> bool:
    """A folder whose config declares a vision tower of a family mlx-vlm can load (and mlx-vlm is here)."""
    if not path.is_dir():
        return False
    config = _config(path)
    if not isinstance(config.get("vision_config"), dict) or not available():
        return False
    from mlx_vlm.utils import get_model_and_args

    try:
        get_model_and_args(dict(config))
    except (ValueError, ImportError):
        log.info(
            "%s has a vision_config, but mlx-vlm has no %r family: loading it as text", path, config.get("model_type")
        )
        return False
    return True


def refuse_options(adapter: bool, kv_bits: int | None) -> None:
    """What a load may ask of an mlx-lm model and not of this backend: a 400 naming it, never ignored.
    (IMPETUS_KV_BITS, the server's own setting, simply does not apply to it.)"""
    if adapter:
        raise InvalidLoadOption("adapter: LoRA adapters are not supported for vision-language models.", "adapter")
    if kv_bits:
        raise InvalidLoadOption("kv_bits: a quantized KV cache is not supported for vision-language models.", "kv_bits")


def load_vision(path: Path, compute_dtype: str | None = None) -> LoadedModel:
    """mlx-vlm's model and processor, mlx-lm's tokenizer wrapper (the text step's detokenizer, the chat
    template, the end tokens) and the backend that runs them. Engine thread only (it evaluates weights)."""
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm.utils import load as load_vlm

    from gerdsen_ai_server.engine.backends.vision import VisionBackend

    family = _config(path).get("model_type")
    if family in UNBATCHABLE:
        raise ModelLoadError(
            f"'{path.name}' is a {family} model: its decoding needs cross-attention or encoder states at every "
            "step, which this server's vision batch does not carry yet."
        )
    model, processor = load_vlm(str(path))
    if compute_dtype is not None:
        dtype = getattr(mx, compute_dtype)
        # Floating weights only: a quantized model's packed integers and scales stay as they are.
        model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    eos = _config(path).get("eos_token_id")
    tokenizer = load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    hf = getattr(processor, "tokenizer", processor)
    if not getattr(tokenizer, "chat_template", None) and getattr(hf, "chat_template", None):
        tokenizer._tokenizer.chat_template = hf.chat_template  # chat_template.json, read by mlx-vlm
        tokenizer.has_chat_template = True
    backend = VisionBackend(model, processor, tokenizer, path.name)
    return LoadedModel(
        model_id=path.name,
        path=path,
        model=backend,
        tokenizer=tokenizer,
        context_length=context_length(path),
        nbytes=parameter_nbytes(model) + tokenizer_bytes(path),  # what estimate_bytes charges (loaders.py)
        backend=BACKEND,
    )
