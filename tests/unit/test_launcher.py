"""The tests' server launcher (tests/support/server.py): a killed pytest (a CI timeout, ^C twice, an xdist
worker that dies) takes the servers it started down with it. Its session end, which stops them, never
runs then, and a Gunicorn left to init kept its port, its memory and a core for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from tests.support import ROOT

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl"),
]

# A stand-in for pytest: starts a server through the launcher (a stdlib HTTP server: the launcher's part is
# the same for Gunicorn, and it starts in a blink), says its pid, and waits to be killed.
PARENT = """
import os, sys, time
from pathlib import Path
from tests.support.server import free_port, launch
port = free_port()
cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
server = launch(cmd, dict(os.environ), port, Path(sys.argv[1]), name="http", ready_path="/", timeout=60)
print(server.process.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_parent_takes_its_server_down(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the stand-in started no server (exit {parent.poll()})"
        pid = int(line)
        assert alive(pid)
    finally:
        parent.kill()  # SIGKILL: no handler, no atexit, as a timeout's kill -9
        parent.wait(10)
    try:
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the server outlived the process that started it"
    finally:
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
