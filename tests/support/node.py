"""Node.js for the tests that run JavaScript (the npm clients, the dashboard's type generator): found, new
enough, or the module skips, saying what to install."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

MIN_NODE = 20  # the oldest the pinned npm packages (the clients', the dashboard's) declare they run on


def node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"v(\d+)\.", version.strip())
    return int(match.group(1)) if match else 0


def require_node(needed_for: str, installs: str) -> str:
    """The ``node`` executable; else skip the calling module: no Node.js (``installs``: what then installs
    the packages, e.g. "`make test` then installs the npm clients"), or one older than MIN_NODE."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"Node.js is missing: install Node.js >= {MIN_NODE} ({installs})", allow_module_level=True)
    if node_major(node) < MIN_NODE:
        pytest.skip(f"Node.js {MIN_NODE} or later is needed for {needed_for}", allow_module_level=True)
    return node
