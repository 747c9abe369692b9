"""Preset files: `<models_dir>/presets/<name>.json` or `.toml`, read, listed, written and deleted.

One file per preset, as Ollama keeps one Modelfile per model and LM Studio one JSON per preset:
JSON is what the server and the CLI write (atomically: a temporary file in the same folder, then
``os.replace``), TOML (``tomllib``) is read too, for hand-written presets. A name is checked against
``PRESET_NAME`` before any path is made from it, and every file read or written must resolve inside
the presets folder, which must resolve inside the models dir: no name, symlink or folder leads out.
No Flask, no MLX: the HTTP API (api/admin/presets.py) and `impetus preset` (cli/presets.py) share it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gerdsen_ai_server.schemas.presets import PRESET_NAME, Preset
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.local import scan
from gerdsen_ai_server.store.paths import inside_any, plain_name

log = logging.getLogger(__name__)

PRESETS_DIR = "presets"  # in the models dir; store/local.py's scan does not list it as a model
SUFFIXES = (".json", ".toml")  # the order a name is looked up in: JSON (what we write) first
MAX_FILE_BYTES = 1 << 20  # a preset holds at most two 256 KiB texts; a larger file is not one
_NAME = re.compile(PRESET_NAME)


class PresetError(Exception):
    """A preset that cannot be read, written or named: ``param`` names what is wrong."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PresetNotFound(PresetError):
    pass


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def check_name(name: str) -> str:
    if not valid_name(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise PresetError(
            f"{shown!r} is not a preset name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            "name",
        )
    return name


def presets_dir(models_dir: Path) -> Path:
    return Path(models_dir) / PRESETS_DIR


def _folder(models_dir: Path, *, create: bool = False) -> Path | None:
    """The presets folder, if it exists (made when ``create``), refused when it resolves outside the models dir."""
    folder = presets_dir(models_dir)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        return None
    if not inside_any(folder, [Path(models_dir)]):
        log.warning("ignored %s: it resolves outside the models dir", folder)
        raise PresetError("The presets folder of the models dir leads outside it; presets are disabled.")
    return folder


def _files(folder: Path, name: str) -> list[Path]:
    return [folder / f"{name}{suffix}" for suffix in SUFFIXES if os.path.lexists(folder / f"{name}{suffix}")]


def load_fields(data: bytes, suffix: str, name: str) -> dict[str, Any]:
    """A preset file's bytes (JSON, or TOML for a ``.toml`` suffix) as a dict, not yet validated."""
    if len(data) > MAX_FILE_BYTES:
        raise PresetError(f"The preset file of {name!r} is larger than {MAX_FILE_BYTES} bytes.")
    try:
        text = data.decode("utf-8")
        raw: Any = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise PresetError(f"The preset file of {name!r} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"The preset file of {name!r} must hold an object (a table).")
    return raw


def parse(data: bytes, suffix: str, name: str) -> Preset:
    """A preset file's bytes as a Preset named ``name`` (its ``name`` field, if any, must agree)."""
    raw = load_fields(data, suffix, name)
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise PresetError(f"The preset file {name}{suffix} names another preset: {raw['name']!r}.", "name")
    try:
        return Preset.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise PresetError(f"The preset {name!r} is invalid: {where}: {first['msg']}", where) from None


def read(models_dir: Path, name: str) -> Preset:
    """The preset ``name`` (its JSON file, else its TOML file), or PresetNotFound."""
    check_name(name)
    folder = _folder(models_dir)
    files = _files(folder, name) if folder is not None else []
    if folder is None or not files:
        raise PresetNotFound(f"There is no preset {name!r}.", "name")
    path = files[0]
    if not inside_any(path, [folder]) or not path.is_file():
        log.warning("ignored preset file %s: it resolves outside the presets folder or is not a file", path)
        raise PresetError(f"The preset file of {name!r} leads outside the presets folder.", "name")
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    return parse(data, path.suffix, name)


def find(models_dir: Path, name: str) -> Preset | None:
    """The preset ``name`` if there is one, else None: a model id that is not a preset name costs no file access.
    A broken preset file is None here too (logged): a request naming it gets the model's 404."""
    if not valid_name(name):
        return None
    try:
        return read(models_dir, name)
    except PresetNotFound:
        return None
    except PresetError as exc:
        log.warning("preset %r unusable: %s", name, exc)
        return None


def list_all(models_dir: Path) -> tuple[list[Preset], dict[str, str]]:
    """Every preset, sorted by name, and the files that are not usable presets (name -> why)."""
    folder = _folder(models_dir)
    if folder is None:
        return [], {}
    names = sorted({p.stem for p in folder.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".")})
    found, broken = [], {}
    for name in names:
        if not valid_name(name):
            broken[name] = "not a valid preset name"
            continue
        try:
            found.append(read(models_dir, name))
        except PresetError as exc:
            broken[name] = str(exc)
    return found, broken


def check_spec(spec: str, param: str, allowed: Sequence[Path] = ()) -> None:
    """A preset's ``model`` or ``adapter`` as a request may name one (store.paths.confine's rules):
    a plain id in the models dir, or an absolute path under IMPETUS_MODEL_PATHS. Whether it exists
    is the load's question: the preset loads untrusted, as a request does."""
    if plain_name(spec):
        return
    if spec.startswith("/") and ".." not in spec.split("/") and inside_any(Path(spec), allowed):
        return
    raise PresetError(
        f"{param} must name a model in the models dir (as GET /api/models lists it), or a path listed "
        "in IMPETUS_MODEL_PATHS.",
        param,
    )


def check(preset: Preset, allowed: Sequence[Path] = ()) -> None:
    check_spec(preset.model, "model", allowed)
    if preset.adapter is not None:
        check_spec(preset.adapter, "adapter", allowed)


def model_named(models_dir: Path, name: str) -> bool:
    """Whether ``name`` is already a model's id (a local one, or the embedded default): a preset may
    not take it, or a request for that model would get the preset instead (409 ``preset_conflict``)."""
    wanted = name.lower()
    if wanted == DEFAULT_MODEL_ID:
        return True
    return any(wanted in (m.id.lower(), m.path.name.lower()) for m in scan(Path(models_dir)))


def exists(models_dir: Path, name: str) -> bool:
    folder = _folder(models_dir)
    return folder is not None and bool(_files(folder, check_name(name)))


def write(models_dir: Path, preset: Preset) -> Path:
    """Write ``preset`` as ``presets/<name>.json`` (atomically), replacing a TOML file of that name."""
    name = check_name(preset.name)
    folder = _folder(models_dir, create=True)
    if folder is None:  # made above, unless something replaced it with a file meanwhile
        raise PresetError("The presets folder of the models dir could not be created.")
    target = folder / f"{name}.json"
    data = json.dumps(preset.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # a symlink named like the target is replaced, never followed
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    (folder / f"{name}.toml").unlink(missing_ok=True)
    return target


def delete(models_dir: Path, name: str) -> None:
    """Remove the preset's files (JSON and TOML), or PresetNotFound."""
    check_name(name)
    folder = _folder(models_dir)
    files = _files(folder, name) if folder is not None else []
    if not files:
        raise PresetNotFound(f"There is no preset {name!r}.", "name")
    for path in files:
        path.unlink()
