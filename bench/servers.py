"""The servers the benchmark compares, started through the tests' launcher (tests/support/server.py):
ours (``impetus serve``, on MLX, again on glibc's malloc, and on its llama.cpp backend),
``python -m mlx_lm.server`` (as shipped, with OpenBLAS, on an fp32 copy) and llama-cpp-python's server;
the environment each runs in and the files (fp32 copy, GGUF) they need.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from bench.report import say
from gerdsen_ai_server.runtime.blas import find_openblas
from tests.support import ROOT
from tests.support.server import Server, free_port, launch

# Our server again on glibc's malloc with the fixed mmap threshold (the fallback where jemalloc is not
# installed; memory.py) instead of jemalloc: what that allocator costs, measured in the same run.
MALLOC_VARIANT = ("IMPETUS_MALLOC", "glibc")


def base_env() -> dict[str, str]:
    """This environment without any BLAS preload (each run sets its own) or server settings."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("IMPETUS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def openblas_env(env: dict[str, str]) -> dict[str, str]:
    lib = find_openblas()
    return {**env, "LD_PRELOAD": str(lib)} if lib else dict(env)


def accelerator(env: dict[str, str]) -> str:
    """'' when MLX computes on the CPU here; else the GPU it computes on (MLX's CUDA or Metal build).

    Asked in a subprocess, as the servers and raw runs see it (this process never imports MLX)."""
    code = (
        "import mlx.core as mx\n"
        "if mx.default_device() == mx.cpu: print('')\n"
        "elif mx.metal.is_available(): print('Metal')\n"
        "else: print('CUDA')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"MLX does not start here:\n{out.stderr[-2000:]}")
    name = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if name == "CUDA":
        from shutil import which

        smi = which("nvidia-smi")
        gpu = (
            subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            .stdout.strip()
            .splitlines()
            if smi
            else []
        )
        name = f"CUDA, {gpu[0]}" if gpu else "CUDA"
    return name


def model_id(server: Server) -> str:
    try:
        data = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
        return str(data[0]["id"])
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return "default_model"


def server_cpu(server: Server) -> float:
    """CPU seconds used so far by the server process and its children (Gunicorn's worker)."""
    import psutil

    try:
        procs = [psutil.Process(server.process.pid)]
        procs += procs[0].children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs)
    except psutil.Error:
        return float("nan")


def gguf_file(model_dir: Path, env: dict[str, str]) -> Path:
    code = (
        "import sys; from pathlib import Path; from bench.gguf_model import write_gguf; "
        "print(write_gguf(Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def fp32_folder(model_dir: Path, env: dict[str, str]) -> Path:
    code = (
        "import sys; from pathlib import Path; from bench.model import fp32_copy; print(fp32_copy(Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def plan(
    args: argparse.Namespace, env: dict[str, str], model_dir: Path, gguf: Path | None
) -> list[tuple[str, str, Any]]:
    """The servers of this run, in order: (key, label, what ``start`` needs of that kind)."""
    runs: list[tuple[str, str, Any]] = [("ours", "ours (impetus serve)", {})]
    if not args.skip_malloc_variant and sys.platform.startswith("linux") and not args.gpu:
        runs.append(("ours malloc", f"ours, {MALLOC_VARIANT[0]}={MALLOC_VARIANT[1]}", dict([MALLOC_VARIANT])))
    if not args.skip_mlx_server:
        runs.append(("mlx", "mlx_lm.server as shipped", (env, model_dir)))
        if not args.skip_mlx_openblas and not args.gpu and find_openblas() is not None:
            runs.append(("mlx+openblas", "mlx_lm.server + OpenBLAS (bf16)", (openblas_env(env), model_dir)))
            runs.append(("mlx+openblas fp32", "mlx_lm.server + OpenBLAS, fp32 copy", (openblas_env(env), None)))
    if gguf is not None:
        runs.append(("ours llama.cpp", "ours, llama.cpp backend (f32 GGUF)", gguf))
        if importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec("uvicorn"):
            runs.append(("llama-cpp-python server", "llama-cpp-python server (f32 GGUF)", gguf))
        else:
            say("llama-cpp-python[server] is not installed: no row for its server")
    return runs


def start(
    key: str,
    label: str,
    spec_env: Any,
    env: dict[str, str],
    model_dir: Path,
    models_dir: Path,
    args: argparse.Namespace,
    logs: Path,
) -> Server:
    """Start one server of ``plan`` on a free port and wait until it is ready; ours also says how it
    computes (``Server.info``: its /health)."""
    port = free_port()
    if key in ("ours", "ours malloc"):
        server_env = {
            **env,
            "IMPETUS_HOST": "127.0.0.1",
            "IMPETUS_PORT": str(port),
            "IMPETUS_DEFAULT_MODEL": str(model_dir),
            "IMPETUS_MODELS_DIR": str(models_dir),
            "IMPETUS_MAX_BATCH": "16",
            "IMPETUS_LOG_LEVEL": "warning",
            **dict(kv.split("=", 1) for kv in args.ours_env),
            **spec_env,
        }
        cmd = [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"]
        ready = "/health/ready"
    elif key == "ours llama.cpp":
        server_env = {
            **env,
            "IMPETUS_HOST": "127.0.0.1",
            "IMPETUS_PORT": str(port),
            "IMPETUS_DEFAULT_MODEL": str(spec_env),
            "IMPETUS_MODELS_DIR": str(models_dir),
            "IMPETUS_BACKEND": "llamacpp",
            "IMPETUS_MAX_BATCH": "16",
            "IMPETUS_LOG_LEVEL": "warning",
        }
        cmd = [sys.executable, "-m", "gerdsen_ai_server.cli", "serve"]
        ready = "/health/ready"
    elif key == "llama-cpp-python server":
        server_env = dict(env)
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(spec_env),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--n_ctx",
            str(getattr(args, "n_ctx", 4096)),  # the agent bench (bench/agent.py) needs 8,192
            "--n_threads",
            str(os.cpu_count() or 1),
            "--n_threads_batch",
            str(os.cpu_count() or 1),
            "--verbose",
            "false",
            # by default a new request interrupts the one running: queue them instead
            "--interrupt_requests",
            "false",
        ]
        ready = "/v1/models"
    else:
        server_env, folder = spec_env
        if folder is None:
            folder = fp32_folder(model_dir, env)
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)]
        ready = "/health"
    say(f"{label}: starting on port {port} ...")
    server = launch(cmd, server_env, port, logs, name=label, ready_path=ready, timeout=300)
    server.model = (
        model_id(server)
        if key in ("ours", "ours malloc", "ours llama.cpp", "llama-cpp-python server")
        else "default_model"
    )
    if key == "ours":
        server.info = requests.get(server.url + "/health", timeout=10).json()
    return server
