#!/usr/bin/env python3
"""The server's OpenAPI document as stable JSON, and the dashboard's wire types generated from it.

    .venv/bin/python scripts/dump_openapi.py [OUT.json]  # the document (standard output without OUT)
    .venv/bin/python scripts/dump_openapi.py --types     # regenerate the dashboard's schema.d.ts
    .venv/bin/python scripts/dump_openapi.py --check     # exit 1 if schema.d.ts is stale

`make dashboard-types` and `make dashboard-types-check` run the last two. The TypeScript types
(impetus-dashboard/src/api/schema.d.ts) come from the document by openapi-typescript, pinned in the
dashboard's package.json, so the dashboard and the pydantic schemas that validate the wire cannot
drift apart unnoticed: tests/unit/test_dashboard_types.py runs the check.

The document is read from the app itself, in process, through Flask's test client: the route, not a
copy of its builder, so the dashboard is typed against what a client downloads. The app is built with
no default model (nothing is loaded) and an empty models folder, with the one setting that shapes the
document pinned (IMPETUS_PROTECT_HEALTH off), so the environment cannot change the output. Keys are
sorted and the indentation fixed: the same API always gives the same bytes. Only the .d.ts is kept in
the repository; the JSON goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DASHBOARD = ROOT / "impetus-dashboard"
SCHEMA_TS = DASHBOARD / "src" / "api" / "schema.d.ts"
GENERATOR = DASHBOARD / "node_modules" / ".bin" / "openapi-typescript"
REGENERATE = "make dashboard-types"


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (for messages)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def openapi_document() -> dict[str, Any]:
    """GET /openapi.json from an app that loads no model; its engine thread is stopped before returning."""
    from gerdsen_ai_server.app import create_app
    from gerdsen_ai_server.services import services

    with tempfile.TemporaryDirectory(prefix="impetus-openapi-") as models_dir:
        app = create_app(
            {"default_model": "", "models_dir": models_dir, "protect_health": False, "log_level": "warning"}
        )
        try:
            response = app.test_client().get("/openapi.json")
        finally:
            services(app).engine.shutdown()  # the inference engine (create_app also stops it at exit)
    if response.status_code != 200:
        raise SystemExit(f"GET /openapi.json answered {response.status_code}: {response.get_data(as_text=True)[:500]}")
    document = response.get_json()
    if not isinstance(document, dict) or "openapi" not in document:
        raise SystemExit("GET /openapi.json did not answer an OpenAPI document")
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate_types(out: Path) -> None:
    """Write the TypeScript types of the server's document to ``out`` with the pinned openapi-typescript."""
    if not GENERATOR.exists():
        raise SystemExit(
            f"{GENERATOR.relative_to(ROOT)} is missing: install the dashboard's dependencies "
            "(`make dashboard`, or pnpm --dir impetus-dashboard install --frozen-lockfile)"
        )
    with tempfile.TemporaryDirectory(prefix="impetus-openapi-") as tmp:
        document = Path(tmp) / "openapi.json"
        document.write_text(render(openapi_document()), encoding="utf-8")
        run = subprocess.run(
            [str(GENERATOR), str(document), "--output", str(out)],
            cwd=DASHBOARD,
            capture_output=True,
            text=True,
            timeout=120,
        )
    if run.returncode != 0 or not out.is_file():
        raise SystemExit(f"openapi-typescript failed ({run.returncode}):\n{run.stdout}{run.stderr}")


def check_types(committed: Path) -> int:
    """0 if ``committed`` is what the generator writes for today's document; else 1 and what differs."""
    with tempfile.TemporaryDirectory(prefix="impetus-types-") as tmp:
        fresh = Path(tmp) / "schema.d.ts"
        generate_types(fresh)
        want = fresh.read_text(encoding="utf-8")
    have = committed.read_text(encoding="utf-8") if committed.is_file() else ""
    if have == want:
        print(f"{shown(committed)} is current")
        return 0
    diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), "committed", "generated", lineterm="", n=1))
    excerpt = "\n".join(diff[:60]) + (f"\n... ({len(diff) - 60} more diff lines)" if len(diff) > 60 else "")
    print(
        f"{shown(committed)} is stale: the server's OpenAPI document (/openapi.json) no longer "
        f"gives these types. Run `{REGENERATE}` and commit the result.\n{excerpt}",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--types", action="store_true", help=f"regenerate {SCHEMA_TS.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {SCHEMA_TS.relative_to(ROOT)} is stale")
    parser.add_argument(
        "out",
        nargs="?",
        type=Path,
        help="the JSON's file (default: standard output); with --types/--check, the .d.ts instead "
        f"of {SCHEMA_TS.relative_to(ROOT)}",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check_types((args.out or SCHEMA_TS).resolve())
    if args.types:
        out = (args.out or SCHEMA_TS).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        generate_types(out)
        print(f"wrote {shown(out)}")
        return 0
    text = render(openapi_document())
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
