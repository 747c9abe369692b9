"""The npm clients (OpenAI's `openai` package; the Vercel AI SDK's `ai` + `@ai-sdk/openai` with a zod
schema) against the real server, run by Node's own test runner from tests/clients/node/.

`make test` installs that package's pinned dependencies from its lockfile (pnpm, frozen); without
Node.js or those dependencies this test skips, saying why, as the browser tests do without Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import DEFAULT_MODEL, ROOT, Server

PACKAGE = ROOT / "tests" / "clients" / "node"
NODE = shutil.which("node")
MIN_NODE = 20  # the oldest the pinned packages declare they run on


def node_major() -> int:
    assert NODE is not None
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"v(\d+)\.", version.strip())
    return int(match.group(1)) if match else 0


if NODE is None:
    pytest.skip("Node.js is missing: install Node.js >= 20 (`make test` then installs the npm clients)",
                allow_module_level=True)
if node_major() < MIN_NODE:
    pytest.skip(f"Node.js {MIN_NODE} or later is needed for the npm clients", allow_module_level=True)
if not (PACKAGE / "node_modules" / ".modules.yaml").is_file():
    pytest.skip(f"{PACKAGE / 'node_modules'} is missing: `make test` installs it "
                f"(pnpm --dir {PACKAGE.relative_to(ROOT)} install --frozen-lockfile)", allow_module_level=True)


def test_npm_clients(server: Server) -> None:
    assert NODE is not None
    # Not `make test`'s LD_PRELOAD (OpenBLAS, for MLX in pytest): nothing of Node's needs it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(IMPETUS_BASE_URL=server.base_url, IMPETUS_MODEL=DEFAULT_MODEL)
    run = subprocess.run([NODE, "--test", "--test-reporter=spec", "clients.test.mjs"], cwd=PACKAGE, env=env,
                         capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert re.search(r"\bpass 5\b", output) and re.search(r"\bfail 0\b", output), output
