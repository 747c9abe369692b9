"""The dashboard's generated wire types (impetus-dashboard/src/api/schema.d.ts) are those of today's API.

The check (`make dashboard-types-check`, i.e. scripts/dump_openapi.py --check) builds the app in
process, reads its /openapi.json and runs the pinned openapi-typescript on it: a schema change on the
server without `make dashboard-types` fails here, naming that command. It needs Node.js and the
dashboard's installed dependencies (`make dashboard` installs them); without them it skips, saying
why, as the npm clients' test does.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.node import require_node

DASHBOARD = ROOT / "impetus-dashboard"
SCHEMA_TS = DASHBOARD / "src" / "api" / "schema.d.ts"
GENERATOR = DASHBOARD / "node_modules" / ".bin" / "openapi-typescript"
NODE = require_node("the dashboard's openapi-typescript", "`make dashboard` then installs openapi-typescript")
if not GENERATOR.exists():
    pytest.skip(
        f"{GENERATOR.relative_to(ROOT)} is missing: `make dashboard` installs the dashboard's dependencies "
        "(pnpm --dir impetus-dashboard install --frozen-lockfile)",
        allow_module_level=True,
    )


def test_generated_types_match_the_servers_openapi_document() -> None:
    assert SCHEMA_TS.is_file(), f"{SCHEMA_TS.relative_to(ROOT)} is missing: run `make dashboard-types`"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dump_openapi.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert f"{SCHEMA_TS.relative_to(ROOT)} is current" in run.stdout, output
