"""Where a request may find a model: the models dir and the paths the operator listed.

A request's ``model`` is untrusted: ``confine`` maps it to an entry of the models dir (or of
IMPETUS_MODEL_PATHS) or refuses it with one uniform message; ``redact_paths`` keeps host paths
out of every error a client sees. No MLX, no Flask: the engine, the API and the CLI share it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from gerdsen_ai_server.store.default_model import default_gguf_path
from gerdsen_ai_server.store.errors import ModelLoadError, ModelRefused

log = logging.getLogger(__name__)

# ---- untrusted specs: what a request's ``model`` may name -------------------------------------

MAX_SPEC_CHARS = 256  # longer than any file name a models dir can hold (255 bytes)
_NAME_CHARS = re.compile(r"[^\x00-\x1f\x7f\\]+")  # no control characters, no NUL, no backslash


def model_not_found(spec: str) -> ModelRefused:
    """The one refusal of a spec a request may not load: the same words whether nothing is there,
    the path is outside the models dir, or a symlink leaves it (no existence oracle), naming no
    host path (the spec is echoed as sent, never expanded)."""
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    return ModelRefused(
        f"The model '{shown}' does not exist or you do not have access to it: a request may "
        "name a model in the models dir, or a path the operator listed in IMPETUS_MODEL_PATHS."
    )


def model_paths(setting: str) -> tuple[Path, ...]:
    """IMPETUS_MODEL_PATHS (comma-separated files or folders, ``~`` expanded) as absolute paths."""
    paths = []
    for item in setting.split(","):
        item = item.strip()
        if item:
            paths.append(Path(os.path.abspath(Path(item).expanduser())))
    return tuple(paths)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``root`` or under it (``root`` resolved too)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def inside_any(path: Path, roots: Sequence[Path]) -> bool:
    return any(_inside(path, root) for root in roots)


def plain_name(name: str) -> bool:
    """A model id as the models dir lists it: ``name`` or ``org/name``, no hidden or dot segment,
    no absolute path, no ``~``, no backslash, control character or NUL."""
    if not name or len(name) > MAX_SPEC_CHARS or not _NAME_CHARS.fullmatch(name) or name.startswith("~"):
        return False
    parts = name.split("/")
    return len(parts) <= 2 and all(part and not part.startswith(".") for part in parts)


MAX_FOLDER_ENTRIES = 10_000  # a model folder holds tens of files; a request may not make us walk a disk


def _links_outside(folder: Path, roots: Sequence[Path]) -> Path | None:
    """A symlink inside a model folder (symlinks resolved) whose target leaves ``roots``, else None;
    the folder itself when it holds more than MAX_FOLDER_ENTRIES entries (not a model folder)."""
    folder = Path(os.path.realpath(folder))
    if not folder.is_dir():
        return None
    for count, child in enumerate(folder.rglob("*")):  # never descends into symlinked folders: each is checked
        if count >= MAX_FOLDER_ENTRIES:
            return folder
        if child.is_symlink() and not inside_any(child, roots):
            return child
    return None


def confine(spec: str, models_dir: Path, allowed: Sequence[Path] = ()) -> Path:
    """The entry of ``models_dir`` (or path under ``allowed``) an untrusted ``spec`` names, or
    ``model_not_found``.

    A request's ``model`` is a name, as GET /api/models lists them: ``name`` or ``org/name``
    (a pulled ``org--name`` folder) directly in the models dir; its target, symlinks resolved,
    must stay in the models dir (or an ``allowed`` path), and so must any symlink in a model
    folder. An absolute path is accepted only when it lies under an ``allowed`` entry, which
    only the operator can set (IMPETUS_MODEL_PATHS). ``~``, ``..``, hidden names, backslashes,
    control characters and NUL never resolve. The refusal is the same in every case, so it
    tells nothing about what exists on the host; the log says why, for the operator.
    """
    models_dir = Path(models_dir)
    roots = [models_dir, *allowed]
    name = spec  # as sent: "tiny\n" is not "tiny"
    found: Path | None = None
    if plain_name(name):
        for candidate in (models_dir / name.replace("/", "--"), models_dir / name.lower().replace("/", "--")):
            if os.path.lexists(candidate):
                found = candidate
                break
    elif (
        allowed
        and name.startswith("/")
        and len(name) <= 4096
        and _NAME_CHARS.fullmatch(name)
        and ".." not in name.split("/")
    ):
        path = Path(name)
        if os.path.lexists(path) and any(path.is_relative_to(root) for root in allowed):
            found = path
    if found is None:
        raise model_not_found(spec)
    if not inside_any(found, roots) or os.path.realpath(found) == os.path.realpath(models_dir):
        log.warning("refused model %r: %s resolves outside the models dir and IMPETUS_MODEL_PATHS", spec, found)
        raise model_not_found(spec)
    if (link := _links_outside(found, roots)) is not None:
        log.warning(
            "refused model %r: %s links outside the models dir and IMPETUS_MODEL_PATHS "
            "(list its target there to allow it)",
            spec,
            link,
        )
        raise model_not_found(spec)
    return found


def redact_paths(text: str, models_dir: Path, allowed: Sequence[Path] = ()) -> str:
    """``text`` with the host's paths replaced by names that tell a client nothing about the host:
    the models dir becomes ``<models_dir>``, each IMPETUS_MODEL_PATHS entry's folder ``<model_paths>``,
    the default model package's folder ``<default model package>``, the home folder ``~``.

    Applied to every load error that leaves the engine (HTTP answers, Socket.IO events); the log
    keeps the full text for the operator.
    """
    roots: list[tuple[str, str]] = []

    def add(path: Path | str, label: str) -> None:
        for form in {os.path.abspath(path), os.path.realpath(path)}:  # never a relative one: "models"
            if form.rstrip("/"):
                roots.append((form.rstrip("/"), label))

    add(models_dir, "<models_dir>")
    for entry in allowed:  # the entry's own name stays: it is what the request named
        add(entry.parent, "<model_paths>")
    try:
        add(default_gguf_path().parent, "<default model package>")
    except ModelLoadError:
        pass
    add(Path.home(), "~")
    for form, label in sorted(roots, key=lambda r: len(r[0]), reverse=True):
        text = re.sub(re.escape(form) + r"(?![\w.-])", label, text)  # "/m" is not the start of "/mnt"
    return text
