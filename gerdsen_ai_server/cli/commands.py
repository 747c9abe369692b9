"""The ``impetus`` command.

    impetus --version
    impetus serve [--model PATH_OR_ID] [--host H] [--port P] [--threads N] [--log-level L]
    impetus pull ORG/NAME | impetus list | impetus rm ID      (cli/models.py)
    impetus preset create|list|show|rm                        (cli/presets.py)
    impetus bench [--quick] [--streams 1,4,8,16] [...]        (bench/run.py, from a source checkout)

``serve`` turns its options into ``IMPETUS_*`` environment variables (the same ones
``gerdsen_ai_server.config.Settings`` reads), preloads OpenBLAS on Linux when it is installed,
prints the base URL and replaces itself with Gunicorn running ``gunicorn_conf``.
Nothing heavy is imported here: MLX is initialised only in the Gunicorn worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gerdsen_ai_server import __version__
from gerdsen_ai_server.cli import models as cli_models
from gerdsen_ai_server.cli import presets as cli_presets

GUNICORN_CONFIG = "python:gerdsen_ai_server.cli.gunicorn_conf"
WSGI_APP = "gerdsen_ai_server.app:create_app()"

# option name -> environment variable read by Settings
_SERVE_ENV = {
    "model": "IMPETUS_DEFAULT_MODEL",
    "host": "IMPETUS_HOST",
    "port": "IMPETUS_PORT",
    "threads": "IMPETUS_THREADS",
    "log_level": "IMPETUS_LOG_LEVEL",
}


def base_url(host: str, port: int) -> str:
    """The OpenAI base URL a client should use for a server bound to host:port."""
    if host in ("", "0.0.0.0", "::", "[::]"):  # nosec B104  # recognises a wildcard bind to print a reachable URL; binds nothing
        host = "127.0.0.1"  # a wildcard bind is reachable on loopback
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"http://{host}:{port}/v1"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="impetus", description="OpenAI-compatible LLM inference server over MLX.")
    parser.add_argument("--version", action="version", version=f"impetus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the API server (Gunicorn, one worker, gthread)")
    serve.add_argument(
        "--model", help="model to load at start: the embedded default id, a local folder or a .gguf file"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, or IMPETUS_HOST)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080, or IMPETUS_PORT)")
    serve.add_argument("--threads", type=int, help="Gunicorn threads: one per open stream plus headroom (default 64)")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    cli_models.add_parsers(sub)
    cli_presets.add_parsers(sub)  # impetus preset create|list|show|rm
    # Its options are bench.run's own (main() hands them over unparsed): see `impetus bench --help`.
    sub.add_parser(
        "bench", add_help=False, help="side-by-side benchmark against python -m mlx_lm.server (same as make bench)"
    )
    return parser


def _bench(argv: list[str]) -> int:
    """Run ``python -m bench.run`` with ``argv``; bench/ lives in the source tree, not the wheel."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "run.py").is_file():
        print(
            "impetus bench: the benchmark runs from a source checkout (bench/ is not installed with the "
            "package); clone the repository and run `make bench`.",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    os.environ.setdefault("IMPETUS_BENCH_COMMAND", " ".join(["impetus", "bench", *argv]))
    from bench.run import main as bench_main

    return bench_main(argv)


def _serve(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    for option, variable in _SERVE_ENV.items():
        value = getattr(args, option)
        if value is not None:
            env[variable] = str(value)

    # Validate the settings now, so a bad value fails here with a clear message rather than in
    # a Gunicorn worker. Settings reads os.environ, so apply the overrides for the check.
    from pydantic import ValidationError

    from gerdsen_ai_server.config import ProfileError, Settings

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        settings = Settings()
        settings.check_profile()  # production beyond loopback: keys and a Host allow-list, or no start
    except ValidationError as exc:
        print(f"impetus: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except ProfileError as exc:
        print(f"impetus: {exc}", file=sys.stderr)
        return 2
    finally:
        os.environ.clear()
        os.environ.update(saved)

    from gerdsen_ai_server.engine.backends.choice import choose
    from gerdsen_ai_server.runtime.blas import preload_env
    from gerdsen_ai_server.runtime.memory import allocator_env

    env = preload_env(env)
    if env["IMPETUS_BLAS"] == "openblas":
        blas = f"OpenBLAS ({env['LD_PRELOAD']})"  # before jemalloc joins LD_PRELOAD
    elif sys.platform.startswith("linux"):
        blas = "reference BLAS (slow; install libopenblas0-pthread for 5-20x faster fp32 on CPU)"
    else:
        blas = "platform default"
    try:
        env = allocator_env(env)
    except ValueError as exc:
        print(f"impetus: {exc}", file=sys.stderr)
        return 2

    print(
        f"impetus {__version__}: model {settings.default_model!r}, {settings.threads} threads, BLAS: {blas}, "
        f"allocator: {env['IMPETUS_ALLOCATOR']}"
    )
    try:  # auto: the faster backend here (engine/backends/choice.py); asks MLX where it computes
        print(f"impetus: {choose(settings.backend).line()}")
    except (ImportError, RuntimeError, OSError) as exc:  # the worker reports a broken MLX with its load
        print(f"impetus: backend (IMPETUS_BACKEND={settings.backend}): undecided, MLX does not start here: {exc}")
    print(f"impetus: serving the OpenAI API at {base_url(settings.host, settings.port)}", flush=True)

    argv = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, WSGI_APP]
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)  # nosec B606  # becomes Gunicorn: our own interpreter, a constant argv
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if (status := cli_models.run(args)) is not None:
        return status
    if (status := cli_presets.run(args)) is not None:
        return status
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
