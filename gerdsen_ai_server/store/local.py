"""The models dir as a list of models: scan it, find a model's folder by id, delete one.

Ids are folder names, except that pulled ``org--name`` folders are known as ``org/name`` (the
Hugging Face repo id). Hidden entries (``.pulls`` staging, lock files) are not models.
No MLX and no Flask: used by ``impetus list`` / ``impetus rm`` and by the HTTP API.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gerdsen_ai_server.store.download import read_manifest
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound
from gerdsen_ai_server.store.formats import detect_format, is_mmproj
from gerdsen_ai_server.store.hub import STAGING, folder_name
from gerdsen_ai_server.store.paths import confine, plain_name

REFUSED = (
    "requests cannot load this entry: its name is not a plain model id, or it (or a symlink in it) "
    "leads out of the models dir; list its target in IMPETUS_MODEL_PATHS to allow it"
)


@dataclass
class LocalModel:
    id: str
    path: Path
    format: str | None
    size_bytes: int
    repo: str | None = None  # where it was pulled from
    commit: str | None = None
    error: str | None = None


def model_id(path: Path) -> str:
    return path.name.replace("--", "/")


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def scan(models_dir: Path, allowed: Sequence[Path] | None = None) -> list[LocalModel]:
    """Every model entry of ``models_dir``, sorted by name; one it cannot use carries ``error``.

    ``allowed`` (IMPETUS_MODEL_PATHS: the HTTP API's view, /api/models): an entry a request could
    not load (``confine``: not a plain name, or it or a symlink in it leads out of the models dir and
    those paths) is listed with why, and is neither read nor walked (size 0).
    """
    models_dir = Path(models_dir)
    found = []
    for path in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
        if path.name.startswith(".") or path.suffix == ".lock" or path.name == "presets":  # store/presets.py's
            continue
        if is_mmproj(path.name):  # a vision model's projector (llamacpp_vision.py), never a model of its own
            continue
        if allowed is not None:
            try:
                confine(path.name, models_dir, allowed)  # what a request naming it gets
            except ModelNotFound:
                found.append(LocalModel(id=model_id(path), path=path, format=None, size_bytes=0, error=REFUSED))
                continue
        manifest = read_manifest(path) or {}
        entry = LocalModel(
            id=model_id(path),
            path=path,
            format=None,
            size_bytes=folder_bytes(path),
            repo=manifest.get("repo"),
            commit=manifest.get("commit"),
        )
        try:
            entry.format = detect_format(path)
        except ModelLoadError as exc:
            entry.error = str(exc)
        found.append(entry)
    return found


def find(models_dir: Path, model: str) -> Path:
    """The entry of ``models_dir`` that ``model`` names (``org/name`` or a folder/file name).

    The same names a request may load (``loaders.plain_name``: no hidden entry, ``..``, ``~``,
    backslash, control character or NUL); a symlink is the entry itself (``remove`` unlinks it).
    """
    name = model.strip()
    if not plain_name(name):
        raise ModelNotFound(f"{model!r} is not a model id in the models dir")
    models_dir = Path(models_dir)
    for candidate in (models_dir / folder_name(name), models_dir / name):
        if os.path.lexists(candidate) and candidate.parent == models_dir:
            return candidate
    raise ModelNotFound(f"no model {model!r} in {models_dir}")


def remove(models_dir: Path, model: str) -> Path:
    """Delete the model's folder (or file) and any partial download of it; returns what was removed."""
    path = find(models_dir, model)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    shutil.rmtree(Path(models_dir) / STAGING / path.name, ignore_errors=True)
    return path
