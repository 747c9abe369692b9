"""``impetus pull``, ``impetus list``, ``impetus rm``: the models dir from the command line, no server needed.

    impetus pull ORG/NAME[:TAG] [--revision R] [--file PATTERN] [--models-dir DIR]
    impetus list [--models-dir DIR]
    impetus rm ID [--models-dir DIR]

The models dir is ``--models-dir`` or ``IMPETUS_MODELS_DIR`` (the server's setting). A running
server sees pulled and removed models at once; ``rm`` of a model a server has loaded frees
nothing until that server unloads it (``DELETE /api/models/<id>`` refuses instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    pull = sub.add_parser("pull", help="download a model from the Hugging Face hub into the models dir")
    pull.add_argument("model", metavar="ID", help="Hugging Face repo id, e.g. mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    pull.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    pull.add_argument(
        "--file",
        "--gguf",
        "--include",
        dest="gguf",
        metavar="PATTERN",
        help="fetch the one .gguf file matching PATTERN (e.g. '*Q4_K_M.gguf') instead of safetensors; "
        "or name its tag as Ollama does: ORG/NAME:Q4_K_M",
    )
    listing = sub.add_parser("list", help="list the models in the models dir")
    remove = sub.add_parser("rm", help="delete a model from the models dir")
    remove.add_argument("model", metavar="ID", help="model id as `impetus list` shows it")
    for parser in (pull, listing, remove):
        parser.add_argument("--models-dir", type=Path, help="default: IMPETUS_MODELS_DIR or ~/.cache/impetus/models")


def run(args: argparse.Namespace) -> int | None:
    """The exit status of a models command, or None when ``args`` is another command."""
    commands = {"pull": _pull, "list": _list, "rm": _rm}
    if args.command not in commands:
        return None
    models_dir = args.models_dir
    if models_dir is None:
        from pydantic import ValidationError

        from gerdsen_ai_server.config import Settings

        try:
            models_dir = Settings().models_dir
        except ValidationError as exc:
            print(f"impetus: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
    return commands[args.command](args, Path(models_dir).expanduser())


def _pull(args: argparse.Namespace, models_dir: Path) -> int:
    from tqdm import tqdm

    from gerdsen_ai_server.store import download, hub

    bar = tqdm(desc=args.model, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, leave=True)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        repo_id, pattern = download.parse_ref(args.model, args.gguf)  # hf.co/org/name:Q4_K_M as Ollama takes it
        path = download.pull(repo_id, models_dir, revision=args.revision, gguf=pattern, on_progress=progress)
    except hub.PullError as exc:
        bar.close()
        print(f"impetus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("impetus: interrupted; run the same command again to continue the download", file=sys.stderr)
        return 130
    bar.close()
    print(f"impetus: pulled {repo_id} into {path}")
    print(f'impetus: use it as "model": "{repo_id}", or `impetus serve --model {repo_id}`')
    return 0


def _list(args: argparse.Namespace, models_dir: Path) -> int:
    from gerdsen_ai_server.store.local import scan

    models = scan(models_dir)
    if not models:
        print(f"no models in {models_dir}; pull one with `impetus pull mlx-community/Qwen2.5-0.5B-Instruct-4bit`")
        return 0
    width = max(len("ID"), *(len(m.id) for m in models))
    print(f"{'ID':<{width}}  {'FORMAT':<6}  {'SIZE':>9}  SOURCE")
    for m in models:
        source = f"{m.repo}@{m.commit[:7]}" if m.repo and m.commit else ""
        if m.error:
            source = f"unusable: {m.error.split('; ')[0]}"  # without the how-to-convert hint
        print(f"{m.id:<{width}}  {m.format or '-':<6}  {human_bytes(m.size_bytes):>9}  {source}".rstrip())
    return 0


def _rm(args: argparse.Namespace, models_dir: Path) -> int:
    from gerdsen_ai_server.store.errors import ModelNotFound
    from gerdsen_ai_server.store.local import find, folder_bytes, remove

    try:
        size = folder_bytes(find(models_dir, args.model))
        path = remove(models_dir, args.model)
    except ModelNotFound as exc:
        print(f"impetus: {exc}", file=sys.stderr)
        return 1
    print(f"impetus: removed {args.model} ({path}, {human_bytes(size)})")
    return 0


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # not reached
