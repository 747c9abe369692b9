"""The dashboard's generated wire types (impetus-dashboard/src/api/schema.d.ts) are those of today's API.

The check (`make dashboard-types-check`, i.e. scripts/dump_openapi.py --check) builds the app in
process, reads its /openapi.json and runs the pinned openapi-typescript on it: a schema change on the
server without `make dashboard-types` fails here, naming that command. It needs Node.js and the
dashboard's installed dependencies (`make dashboard` installs them); without them it skips, saying
why, as the npm clients' test does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "impetus-dashboard"
SCHEMA_TS = DASHBOARD / "src" / "api" / "schema.d.ts"
GENERATOR = DASHBOARD / "node_modules" / ".bin" / "openapi-typescript"
NODE = shutil.which("node")
MIN_NODE = 20  # the oldest the dashboard's pinned packages run on


def node_major() -> int:
    assert NODE is not None
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"v(\d+)\.", version.strip())
    return int(match.group(1)) if match else 0


if NODE is None:
    pytest.skip("Node.js is missing: install Node.js >= 20 (`make dashboard` then installs openapi-typescript)",
                allow_module_level=True)
if node_major() < MIN_NODE:
    pytest.skip(f"Node.js {MIN_NODE} or later is needed for the dashboard's openapi-typescript", allow_module_level=True)
if not GENERATOR.exists():
    pytest.skip(f"{GENERATOR.relative_to(ROOT)} is missing: `make dashboard` installs the dashboard's dependencies "
                "(pnpm --dir impetus-dashboard install --frozen-lockfile)", allow_module_level=True)


def test_generated_types_match_the_servers_openapi_document() -> None:
    assert SCHEMA_TS.is_file(), f"{SCHEMA_TS.relative_to(ROOT)} is missing: run `make dashboard-types`"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "dump_openapi.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert f"{SCHEMA_TS.relative_to(ROOT)} is current" in run.stdout, output
