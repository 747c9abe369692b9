"""The `impetus` command and the BLAS probe (no server is started here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gerdsen_ai_server import __version__
from gerdsen_ai_server.cli import commands as cli
from gerdsen_ai_server.runtime import blas, memory
from gerdsen_ai_server.runtime.memory import find_jemalloc


def test_version_via_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gerdsen_ai_server.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"impetus {__version__}"


def test_console_script_installed() -> None:
    script = Path(sys.executable).parent / "impetus"
    if not script.exists():
        pytest.skip("console script not installed (run `make setup`)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"impetus {__version__}"


def test_serve_rejects_bad_port_before_exec() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gerdsen_ai_server.cli", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "port" in result.stderr


def test_find_openblas_returns_path_or_none() -> None:
    found = blas.find_openblas()
    assert found is None or (isinstance(found, Path) and found.is_file())


def test_blas_in_use_is_known_value() -> None:
    assert blas.blas_in_use() in ("openblas", "reference", "accelerate")


def test_preload_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(blas, "find_openblas", lambda: lib)

    env = blas.preload_env({"LD_PRELOAD": "/x/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so"
    assert env["IMPETUS_BLAS"] == "openblas"

    env = blas.preload_env({"IMPETUS_NO_OPENBLAS": "1"})
    assert "LD_PRELOAD" not in env
    assert env["IMPETUS_BLAS"] == "reference"

    already = {"LD_PRELOAD": "/usr/lib/x/openblas-pthread/libopenblas.so.0"}
    assert blas.preload_env(already)["LD_PRELOAD"] == already["LD_PRELOAD"]

    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    assert blas.preload_env({})["IMPETUS_BLAS"] == "reference"


def test_allocator_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(memory, "find_jemalloc", lambda: lib)
    monkeypatch.setattr(memory.sys, "platform", "linux")

    env = memory.allocator_env({"LD_PRELOAD": "/x/libopenblas.so.0"})  # after OpenBLAS (preload_env's)
    assert env["LD_PRELOAD"] == f"/x/libopenblas.so.0:{lib}"
    assert env["MALLOC_CONF"] == memory.JEMALLOC_CONF and env["IMPETUS_ALLOCATOR"] == "jemalloc"
    assert memory.allocator_env({"MALLOC_CONF": "narenas:2"})["MALLOC_CONF"] == "narenas:2"  # the user's own

    env = memory.allocator_env({"IMPETUS_MALLOC": "glibc"})
    assert "LD_PRELOAD" not in env and "MALLOC_CONF" not in env and env["IMPETUS_ALLOCATOR"] == "glibc"

    monkeypatch.setattr(memory, "find_jemalloc", lambda: None)
    assert memory.allocator_env({})["IMPETUS_ALLOCATOR"] == "glibc"
    with pytest.raises(ValueError, match="libjemalloc2"):
        memory.allocator_env({"IMPETUS_MALLOC": "jemalloc"})

    monkeypatch.setattr(memory, "find_jemalloc", find_jemalloc)  # the real one
    monkeypatch.setattr(memory.sys, "platform", "darwin")  # macOS: the system allocator, nothing preloaded
    assert memory.find_jemalloc() is None
    assert memory.allocator_env({}) == {"IMPETUS_ALLOCATOR": "system"}


def test_serve_rejects_an_unknown_allocator() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"],
        capture_output=True,
        text=True,
        env={**os.environ, "IMPETUS_MALLOC": "tcmalloc"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "malloc" in result.stderr


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8080, "http://127.0.0.1:8080/v1"),
        ("0.0.0.0", 9000, "http://127.0.0.1:9000/v1"),
        ("::1", 8080, "http://[::1]:8080/v1"),
        ("example.internal", 80, "http://example.internal:80/v1"),
    ],
)
def test_base_url(host: str, port: int, url: str) -> None:
    assert cli.base_url(host, port) == url


def test_gunicorn_conf_is_one_gthread_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import gerdsen_ai_server.cli.gunicorn_conf as conf

    monkeypatch.delenv("IMPETUS_HOST", raising=False)
    monkeypatch.setenv("IMPETUS_PORT", "8123")
    monkeypatch.setenv("IMPETUS_THREADS", "32")
    try:
        conf = importlib.reload(conf)
        assert conf.workers == 1
        assert conf.worker_class == "gerdsen_ai_server.cli.http_worker.ImpetusWorker"  # gthread, heads read first
        from gunicorn.workers.gthread import ThreadWorker

        from gerdsen_ai_server.cli.http_worker import ImpetusWorker

        assert issubclass(ImpetusWorker, ThreadWorker)
        assert conf.threads == 32
        assert conf.bind == ["127.0.0.1:8123"]
        assert not getattr(conf, "preload_app", False)
    finally:
        monkeypatch.undo()
        importlib.reload(conf)
