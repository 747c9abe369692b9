#!/usr/bin/env python3
"""Regenerate the settings and profiles tables in docs/configuration.md from gerdsen_ai_server.config.

    .venv/bin/python scripts/gen_config_docs.py          # rewrite the table in place
    .venv/bin/python scripts/gen_config_docs.py --check  # exit 1 if the table is stale

Only the text between the BEGIN/END markers is generated; the rest of the page is hand-written.
The profiles table comes from config.PROFILE_DEFAULTS and config.PROFILE_REQUIRES, so it cannot
drift from what IMPETUS_PROFILE does (tests/unit/test_profiles.py fails when it is stale).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gerdsen_ai_server.config import PROFILE_DEFAULTS, PROFILE_REQUIRES, Settings  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN SETTINGS TABLE (scripts/gen_config_docs.py) -->"
END = "<!-- END SETTINGS TABLE -->"
PROFILES_BEGIN = "<!-- BEGIN PROFILES TABLE (scripts/gen_config_docs.py) -->"
PROFILES_END = "<!-- END PROFILES TABLE -->"
# The rows for PROFILE_REQUIRES: what a profile demands before it serves beyond loopback.
REQUIREMENTS = {
    "api_keys": (
        "An API key (`IMPETUS_API_KEYS`, `IMPETUS_ADMIN_KEYS` or `IMPETUS_API_KEY_FILE`) on a bind beyond loopback",
        "not required (a warning at start)",
    ),
    "allowed_hosts": ("A Host allow-list (`IMPETUS_ALLOWED_HOSTS`) on a bind beyond loopback", "not required"),
}


def _default(field) -> str:  # type: ignore[no-untyped-def]
    if field.default_factory is not None:
        return _value(field.default_factory())
    return _value(field.default)


def _value(value: object) -> str:
    text = str(value)
    home = str(Path.home())
    if text.startswith(home):
        text = "~" + text[len(home) :]
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


def profiles_table() -> str:
    """One column per profile: the value of every setting some profile changes, then what each requires."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = list(PROFILE_DEFAULTS)
    rows = [
        "| | "
        + " | ".join(f"`{p}`" + (" (default)" if p == Settings.model_fields["profile"].default else "") for p in names)
        + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    changed = [n for n in Settings.model_fields if any(n in PROFILE_DEFAULTS[p] for p in names)]
    for name in changed:
        field = Settings.model_fields[name]
        cells = [_value(PROFILE_DEFAULTS[p][name]) if name in PROFILE_DEFAULTS[p] else _default(field) for p in names]
        rows.append(f"| `{prefix}{name.upper()}` | " + " | ".join(cells) + " |")
    for requirement, (label, absent) in REQUIREMENTS.items():
        cells = ["required: refuses to start without" if requirement in PROFILE_REQUIRES[p] else absent for p in names]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _replace(text: str, begin: str, end_marker: str, body: str) -> str:
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: markers not found ({begin!r} ... {end_marker!r})")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[end:]


def render(text: str) -> str:
    return _replace(_replace(text, BEGIN, END, table()), PROFILES_BEGIN, PROFILES_END, profiles_table())


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
