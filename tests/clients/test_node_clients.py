"""The npm clients (OpenAI's `openai` package; the Vercel AI SDK's `ai` + `@ai-sdk/openai` with a zod
schema) against the real server, run by Node's own test runner from tests/clients/node/.

`make test` installs that package's pinned dependencies from its lockfile (pnpm, frozen); without
Node.js or those dependencies this test skips, saying why, as the browser tests do without Chromium.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support import DEFAULT_MODEL, ROOT
from tests.support.node import require_node
from tests.support.server import Server

pytestmark = pytest.mark.server

PACKAGE = ROOT / "tests" / "clients" / "node"
NODE = require_node("the npm clients", "`make test` then installs the npm clients")
if not (PACKAGE / "node_modules" / ".modules.yaml").is_file():
    pytest.skip(
        f"{PACKAGE / 'node_modules'} is missing: `make test` installs it "
        f"(pnpm --dir {PACKAGE.relative_to(ROOT)} install --frozen-lockfile)",
        allow_module_level=True,
    )


def test_npm_clients(server: Server) -> None:
    assert NODE is not None
    # Not `make test`'s LD_PRELOAD (OpenBLAS, for MLX in pytest): nothing of Node's needs it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(IMPETUS_BASE_URL=server.base_url, IMPETUS_MODEL=DEFAULT_MODEL)
    run = subprocess.run(
        [NODE, "--test", "--test-reporter=spec", "clients.test.mjs"],
        cwd=PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert re.search(r"\bpass 5\b", output) and re.search(r"\bfail 0\b", output), output
