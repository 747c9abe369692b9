"""`impetus preset create|list|show|rm`: presets in the models dir from the command line, no server needed.

    impetus preset create NAME --model M [--file preset.json|toml] [--temperature T] [--max-tokens N]
                          [--system TEXT] [--context-length N] [...] [--force]
    impetus preset list | impetus preset show NAME | impetus preset rm NAME      [--models-dir DIR]

Like ``ollama create NAME -f Modelfile``: ``--file`` holds the preset (JSON or TOML, the schema of
/api/presets), options given on the command line replace its values. The files are
``<models_dir>/presets/<name>.json`` (store/presets.py); a running server sees a change at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# option -> the preset's field (parameters.* are request defaults)
PARAMETERS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "max_tokens": int,
    "seed": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
}


def add_parsers(sub: Any) -> None:
    preset = sub.add_parser("preset", help="create, list, show or remove presets (aliases with defaults)")
    actions = preset.add_subparsers(dest="preset_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create (or with --force replace) a preset")
    create.add_argument("name", metavar="NAME", help="the alias clients will name as `model`")
    create.add_argument("--model", help="the model it serves (an id as `impetus list` shows it)")
    create.add_argument("--file", type=Path, help="a preset file (JSON or TOML) to start from")
    create.add_argument("--description")
    for option, kind in PARAMETERS.items():
        create.add_argument("--" + option.replace("_", "-"), type=kind, help="request default")
    create.add_argument("--stop", action="append", help="a stop sequence (repeat for several)")
    create.add_argument("--system", help="system prompt, used when a request has none")
    create.add_argument("--chat-template-file", type=Path, help="a Jinja file replacing the model's chat template")
    create.add_argument("--context-length", type=int, help="tokens (a load option)")
    create.add_argument("--rope-scaling", action="store_true", default=None, help="allow RoPE scaling (load option)")
    create.add_argument("--keep-alive", type=float, help="idle seconds it stays loaded; negative keeps it")
    create.add_argument("--backend", choices=("auto", "mlx", "llamacpp"), help="a load option")
    create.add_argument("--adapter", help="a LoRA adapter in the models dir (a load option)")
    create.add_argument("--force", action="store_true", help="replace a preset of that name")
    listing = actions.add_parser("list", help="list the presets")
    show = actions.add_parser("show", help="print a preset as JSON")
    show.add_argument("name", metavar="NAME")
    remove = actions.add_parser("rm", help="delete a preset")
    remove.add_argument("name", metavar="NAME")
    for parser in (create, listing, show, remove):
        parser.add_argument("--models-dir", type=Path, help="default: IMPETUS_MODELS_DIR or ~/.cache/impetus/models")


def run(args: argparse.Namespace) -> int | None:
    """The exit status of a preset command, or None when ``args`` is another command."""
    if args.command != "preset":
        return None
    from pydantic import ValidationError

    from gerdsen_ai_server.config import Settings
    from gerdsen_ai_server.store.paths import model_paths
    from gerdsen_ai_server.store.presets import PresetError

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"impetus: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    models_dir = Path(args.models_dir or settings.models_dir).expanduser()
    commands = {"create": _create, "list": _list, "show": _show, "rm": _rm}
    try:
        return commands[args.preset_command](args, models_dir, model_paths(settings.model_paths))
    except PresetError as exc:
        print(f"impetus: {exc}", file=sys.stderr)
        return 1


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The preset as ``--file`` and the options give it (an option replaces the file's value)."""
    from gerdsen_ai_server.store.presets import PresetError

    raw: dict[str, Any] = {}
    if args.file is not None:
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            raise PresetError(f"cannot read {args.file}: {exc.strerror}") from None
        from gerdsen_ai_server.store.presets import load_fields

        raw = load_fields(data, args.file.suffix.lower(), args.name)  # its own name, if any, gives way to NAME
    raw["name"] = args.name
    given = raw.get("parameters") or {}
    if not isinstance(given, dict):
        raise PresetError(f"{args.file}: parameters must be an object (a table)")
    parameters = dict(given)
    for option in PARAMETERS:
        if getattr(args, option) is not None:
            parameters[option] = getattr(args, option)
    if args.stop:
        parameters["stop"] = args.stop
    raw["parameters"] = parameters
    for field in ("model", "description", "system", "context_length", "rope_scaling", "keep_alive", "backend"):
        if getattr(args, field) is not None:
            raw[field] = getattr(args, field)
    if args.adapter is not None:
        raw["adapter"] = args.adapter
    if args.chat_template_file is not None:
        raw["chat_template"] = args.chat_template_file.read_text(encoding="utf-8")
    if "model" not in raw:
        raise PresetError("a preset needs --model (or a file with `model`)")
    return raw


def _create(args: argparse.Namespace, models_dir: Path, allowed: tuple[Path, ...]) -> int:
    from pydantic import ValidationError

    from gerdsen_ai_server.schemas.presets import Preset
    from gerdsen_ai_server.store import presets as store

    store.check_name(args.name)
    try:
        preset = Preset.model_validate(_fields(args))
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"impetus: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", file=sys.stderr)
        return 1
    store.check(preset, allowed)
    if store.model_named(models_dir, preset.name):
        print(f"impetus: {preset.name!r} is already a model's id; choose another name", file=sys.stderr)
        return 1
    if store.exists(models_dir, preset.name) and not args.force:
        print(f"impetus: there is a preset {preset.name!r} already (--force replaces it)", file=sys.stderr)
        return 1
    path = store.write(models_dir, preset)
    print(f"impetus: preset {preset.name} -> {preset.model} written to {path}")
    print(f'impetus: use it as "model": "{preset.name}"')
    return 0


def _list(args: argparse.Namespace, models_dir: Path, allowed: tuple[Path, ...]) -> int:
    from gerdsen_ai_server.store import presets as store

    found, broken = store.list_all(models_dir)
    if not found and not broken:
        print(f"no presets in {store.presets_dir(models_dir)}; make one with `impetus preset create NAME --model M`")
        return 0
    width = max(len("NAME"), *(len(p.name) for p in found), *(len(n) for n in broken))
    print(f"{'NAME':<{width}}  MODEL")
    for preset in found:
        loads = " (own load options)" if preset.has_load_options() else ""
        print(f"{preset.name:<{width}}  {preset.model}{loads}")
    for name, why in broken.items():
        print(f"{name:<{width}}  unusable: {why}")
    return 0


def _show(args: argparse.Namespace, models_dir: Path, allowed: tuple[Path, ...]) -> int:
    from gerdsen_ai_server.store import presets as store

    print(json.dumps(store.read(models_dir, args.name).model_dump(mode="json"), indent=2, ensure_ascii=False))
    return 0


def _rm(args: argparse.Namespace, models_dir: Path, allowed: tuple[Path, ...]) -> int:
    from gerdsen_ai_server.store import presets as store

    store.delete(models_dir, args.name)
    print(f"impetus: removed preset {args.name}")
    return 0
