#!/usr/bin/env python3
"""Regenerate the settings table in docs/configuration.md from gerdsen_ai_server.config.Settings.

    .venv/bin/python scripts/gen_config_docs.py          # rewrite the table in place
    .venv/bin/python scripts/gen_config_docs.py --check  # exit 1 if the table is stale

Only the text between the BEGIN/END markers is generated; the rest of the page is hand-written.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gerdsen_ai_server.config import Settings  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN SETTINGS TABLE (scripts/gen_config_docs.py) -->"
END = "<!-- END SETTINGS TABLE -->"


def _default(field) -> str:  # type: ignore[no-untyped-def]
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    text = str(value)
    home = str(Path.home())
    if text.startswith(home):
        text = "~" + text[len(home):]
    return f"`{text}`" if text != "" else "(empty)"


def _type(field) -> str:  # type: ignore[no-untyped-def]
    return _type_name(field.annotation)


def _type_name(annotation) -> str:  # type: ignore[no-untyped-def]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if len(args) == 1 and len(typing.get_args(annotation)) == 2:  # X | None
        return _type_name(args[0]) + " (optional)"
    name = getattr(annotation, "__name__", None) or str(annotation)
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path"}.get(name, name)


def table() -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| Variable | Type | Default | Meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name.upper()}` | {_type(field)} | {_default(field)} | {description} |")
    return "\n".join(rows)


def render(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: markers not found ({BEGIN!r} ... {END!r})")
    return text[: start + len(BEGIN)] + "\n" + table() + "\n" + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args()
    current = DOC.read_text(encoding="utf-8")
    updated = render(current)
    if args.check:
        if updated != current:
            print(f"{DOC.relative_to(ROOT)} is stale: run scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        DOC.write_text(updated, encoding="utf-8")
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
