"""LoRA adapters: find one (confined like a model), tell its kind, check and apply it to a loaded model.

Two kinds, the ones the peers serve: mlx-lm's adapter folders (``adapter_config.json`` +
``adapters.safetensors``, what ``mlx_lm.lora`` writes and ``mlx_lm.server --adapter-path`` loads)
for MLX models, applied with mlx-lm's own ``load_adapters``; and GGUF LoRA files
(``general.type = adapter``, what llama.cpp's ``convert_lora_to_gguf.py`` writes and
``llama-server --lora`` loads) for the llama.cpp backend (backends/llamacpp.py applies them).

A request's adapter is untrusted exactly like its model: a name in the models dir or a path under
IMPETUS_MODEL_PATHS, else one uniform 404 naming nothing of the host (``store.paths.confine``).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.formats.encoder import is_encoder
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.engine.options import LoadOptions
from gerdsen_ai_server.store.errors import ModelLoadError, ModelRefused, UnsupportedModelFormat
from gerdsen_ai_server.store.paths import confine, inside_any

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # mlx_lm/lora.py save_config
ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx_lm/tuner/trainer.py TrainingArgs.adapter_file


def adapter_not_found(spec: str) -> ModelRefused:
    """The one refusal of an adapter a request may not load: the same words whatever the reason
    (as ``store.paths.model_not_found`` for a model), echoing the spec as sent."""
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    return ModelRefused(
        f"The adapter '{shown}' does not exist or you do not have access to it: a request may "
        "name an adapter in the models dir, or a path the operator listed in IMPETUS_MODEL_PATHS."
    )


def locate(
    spec: str, models_dir: Path, *, trusted: bool = False, allowed: Sequence[Path] = (), again: bool = False
) -> Path:
    """The adapter folder or GGUF file ``spec`` names, checked to be an adapter (``kind``).

    Untrusted: ``confine``'s rules, the model's own (a name in ``models_dir``, an absolute path
    under ``allowed``), refused with ``adapter_not_found``. Trusted (the operator's, or a spec this
    load's ``resolve`` has already confined): a path anywhere, else a name in ``models_dir``.
    ``again``: the engine checks the absolute path ``located`` made of a request's name; one inside
    the models dir is accepted then (a request's own absolute path never is, as for a model).
    """
    if trusted:
        path = Path(spec).expanduser()
        if not path.is_absolute():
            path = next(
                (c for c in (models_dir / spec.replace("/", "--"), models_dir / spec.lower()) if os.path.lexists(c)),
                models_dir / spec,
            )
        if not path.exists():
            raise adapter_not_found(spec)
    else:
        # With confine's every check (symlinks out, hidden names, ...).
        inside = again and inside_any(Path(spec), [models_dir])
        roots = (*allowed, Path(os.path.abspath(models_dir))) if inside else allowed
        try:
            path = confine(spec, models_dir, roots)
        except ModelRefused:
            raise adapter_not_found(spec) from None
    kind(path, spec)
    return path


def estimate(options: LoadOptions | None) -> int:
    """Bytes the adapter of ``options`` adds to a load's memory estimate (0: none, or not yet located)."""
    if options is None or options.adapter is None or not Path(options.adapter).is_absolute():
        return 0
    try:
        return nbytes(Path(options.adapter))
    except OSError:
        return 0


def for_load(options: LoadOptions, models_dir: Path, model: Path) -> Path | None:
    """The adapter to apply to the model at ``model`` (resolved), checked to fit its backend; None:
    no adapter. The spec was confined by this load's ``LoaderFactory.resolve``, so it is trusted here."""
    if options.adapter is None:
        return None
    name = shown(options.adapter, models_dir)
    path = locate(options.adapter, models_dir, trusted=True)
    if model.is_dir() and is_encoder(model):
        raise UnsupportedModelFormat(
            f"The adapter '{name}' cannot be applied: this is an embedding model, and adapters "
            "apply to language models."
        )
    check_backend(path, str(name), "llamacpp" if model.suffix.lower() == ".gguf" else "mlx")
    return gguf_file(path) or path  # llama.cpp takes the file itself


def kind(path: Path, spec: str) -> str:
    """'mlx' for an mlx-lm adapter folder, 'gguf' for a GGUF LoRA file (or a folder holding one);
    anything else is UnsupportedModelFormat (422) saying what an adapter is."""
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file():
        return "mlx"
    gguf = gguf_file(path)
    if gguf is not None:
        try:
            meta = read_gguf_header(gguf).metadata
        except ModelLoadError:
            meta = {}
        if meta.get("general.type") == "adapter":
            return "gguf"
    raise UnsupportedModelFormat(
        f"'{spec}' is not a LoRA adapter: expected an mlx-lm adapter folder ({ADAPTER_CONFIG} + "
        f"{ADAPTER_WEIGHTS}, as mlx_lm.lora writes it) or a GGUF LoRA file (general.type = adapter, "
        "as llama.cpp's convert_lora_to_gguf.py writes it)."
    )


def is_adapter(path: Path) -> bool:
    """Whether a models-dir entry is a LoRA adapter (for the listing: cheap, never raises): an mlx-lm
    adapter folder, or a GGUF whose leading ``general.*`` metadata says ``general.type = adapter``."""
    if path.is_dir():
        return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()
    return path.suffix.lower() == ".gguf" and _gguf_general_type(path) == "adapter"


def _gguf_general_type(path: Path) -> str | None:
    """``general.type`` when it is among the first string metadata of the GGUF (where llama.cpp's
    converters write it), without reading the tokenizer arrays that follow; else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head[:4] != b"GGUF" or len(head) < 24:
        return None
    offset, count = 24, struct.unpack_from("<Q", head, 16)[0]
    try:
        for _ in range(min(count, 16)):
            (size,) = struct.unpack_from("<Q", head, offset)
            key = head[offset + 8 : offset + 8 + size].decode("utf-8", "replace")
            (vtype,) = struct.unpack_from("<I", head, offset + 8 + size)
            offset += 12 + size
            if vtype != 8:  # a string; anything else comes after the general.* strings we look for
                return None
            (size,) = struct.unpack_from("<Q", head, offset)
            value = head[offset + 8 : offset + 8 + size].decode("utf-8", "replace")
            offset += 8 + size
            if key == "general.type":
                return value
    except struct.error:
        return None
    return None


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` is, or the one GGUF in the folder ``path``; else None."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        found = [p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file()]
        if len(found) == 1:
            return found[0]
    return None


def nbytes(path: Path) -> int:
    """Bytes of the adapter's weights on disk: what loading it adds to the model's memory."""
    gguf = gguf_file(path)
    if gguf is not None:
        return gguf.stat().st_size
    weights = path / ADAPTER_WEIGHTS
    return weights.stat().st_size if weights.is_file() else 0


def check_backend(path: Path, spec: str, backend: str) -> None:
    """An adapter fits the backend that runs the model: mlx-lm folders on MLX, GGUF LoRA on llama.cpp."""
    want = "gguf" if backend == "llamacpp" else "mlx"
    if kind(path, spec) != want:
        runs = "llama.cpp (a GGUF model)" if backend == "llamacpp" else "MLX"
        needs = "a GGUF LoRA file" if backend == "llamacpp" else "an mlx-lm adapter folder"
        raise UnsupportedModelFormat(
            f"The adapter '{spec}' does not fit this model: it runs on {runs}, which needs {needs}."
        )


def apply_mlx(model: Any, path: Path, models_dir: Path) -> Any:
    """Apply an mlx-lm adapter folder to ``model`` with mlx-lm's own ``load_adapters`` (what
    ``mlx_lm.load(adapter_path=...)`` and ``mlx_lm.server`` do), then ``eval()`` as mlx_lm.load does.

    ``load_adapters`` checks every tensor's name and shape against the model; a mismatch (an adapter
    trained for another architecture or size) or a broken config is UnsupportedModelFormat (a 422
    naming the adapter), never a half-applied model serving garbage.
    """
    from mlx_lm.tuner.utils import load_adapters

    spec = str(shown(str(path), models_dir))
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        if not isinstance(config, dict) or not isinstance(config.get("lora_parameters", {}), dict):
            raise ValueError(f"{ADAPTER_CONFIG} is not an mlx-lm adapter config")
        model = load_adapters(model, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("adapter %s does not fit: %s", path, exc)
        lines = str(exc).replace(str(path), spec).splitlines()
        detail = "\n".join(lines[:4] + ([f"  ... and {len(lines) - 4} more"] if len(lines) > 4 else []))
        raise UnsupportedModelFormat(f"The adapter '{spec}' does not fit this model: {detail}") from None
    model.eval()
    return model


def alias(model: str, adapter: str) -> str:
    """The resident id of ``model`` with ``adapter`` applied: ``<model>+<adapter>``, its own model in
    /v1/models (as a request names them both), never the base model's id."""
    return f"{model}+{adapter}"


def located(spec: str, options: LoadOptions | None, models_dir: Path, allowed: Sequence[Path]) -> LoadOptions | None:
    """``options`` with a request's adapter located (``locate``: 404 outside the models dir and
    IMPETUS_MODEL_PATHS, 422 not an adapter) and given as the absolute path the engine loads, under
    the alias ``<model>+<adapter>`` unless a preset named it. Nothing else changes."""
    if options is None or options.adapter is None:
        return options
    path = locate(options.adapter, Path(models_dir), allowed=allowed)
    return replace(options, adapter=os.path.abspath(path), alias=options.alias or alias(spec, options.adapter))


def shown(adapter: str | None, models_dir: Path) -> str | None:
    """An adapter as /api/models shows it: its name in the models dir, else its path (IMPETUS_MODEL_PATHS)."""
    if adapter is None:
        return None
    path, root = Path(adapter), Path(os.path.abspath(models_dir))
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else adapter
