"""Side-by-side benchmark: our server against ``python -m mlx_lm.server`` and raw mlx-lm, one run.

    make bench                              # the full run (~6-10 min on 2 cores); writes docs/performance.md
    impetus bench [options]                 # the same
    python -m bench.run --quick             # ~2-minute smoke run (still writes docs/performance.md unless --no-write)
    python -m bench.run --tiny --out F.md   # seconds: a 2-layer model, for tests
    make bench ARGS='--proxy'               # the micro-model proxy for host overhead: bench/overhead.py

One after the other, on one bench model (``bench/model.py``: random-weight llama, hidden 512,
8 layers, bfloat16 as stored) and one machine:

1. raw in-process mlx-lm (``bench/raw.py``, a subprocess each): one stream (``stream_generate``)
   and ``batch_generate`` on 4/8/16 prompts, in bfloat16 as stored with the wheel's reference
   BLAS, and in float32 with OpenBLAS preloaded (what our server computes in on a Linux CPU);
2. our server: ``impetus serve`` with ``IMPETUS_DEFAULT_MODEL=<bench folder>``, ``IMPETUS_MAX_BATCH=16``
   (``--ours-env`` adds settings), and on Linux again with ``IMPETUS_MALLOC=glibc`` (glibc's malloc
   with the fixed mmap threshold instead of jemalloc: what that allocator costs; ``--skip-malloc-variant``);
3. ``python -m mlx_lm.server --model <bench folder>`` as shipped, again with the same OpenBLAS
   preload (at 8 streams only: bf16 never reaches the BLAS, and it measured as shipped in every run),
   and (engine to engine, same compute) with OpenBLAS on a float32 copy of the model;
4. when ``llama_cpp`` is installed (``--skip-llamacpp`` to leave it out), the same weights as an
   f32 GGUF (``bench/gguf_model.py``): raw in-process llama.cpp, one stream
   (``bench/raw_llamacpp.py``); our server on its llama.cpp backend (``IMPETUS_BACKEND=llamacpp``);
   and llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``) as the peer, with
   the issue 12 targets.

Where MLX computes on a GPU (its CUDA or Metal build), there is no BLAS to choose: the raw reference is
bf16 as stored, the OpenBLAS peers and the malloc variant are left out, the targets add "8 streams
≥ 3x one stream", and the run is written to its own block of docs/performance.md.

The servers are all started, then each concurrency level runs on each server in turn (only one
is driven at a time): on a shared 2-core machine the load from other work drifts by the minute,
and interleaving makes it fall on every server alike (``--sequential``: one server process at a
time). The limits the targets compare with (raw one stream, ``batch_generate`` on 8 prompts, in the
configuration our server computes in) are measured again in every round of the 1- and 8-stream
levels, just before the servers, by one resident raw process (``bench.raw --serve``, idle in
between): each round's ratio compares figures taken seconds apart, not the start and the end of a
run on a machine whose speed drifts by 20 % and more, and the targets take the median of the
rounds' ratios (9 rounds by default: on a 2-core host whose speed moves ±10 % between rounds, a
median of 5 missed the 8-stream target in one run of five whose 25 rounds had a median of 102 %;
resampling those rounds, 9 halve how often that happens, for about a minute more a run).

Every server gets the same streaming client (``bench/client.py``): closed-loop streams at each
concurrency (aggregate output tok/s, p50/p99 time to first token), then a multi-turn chat with
a ~1,000-token history sent cold and again with one more turn (warm: the prompt-prefix cache).
Prints markdown tables and the issue 3 targets, met or not, and writes them with the date,
machine, versions and command to ``docs/performance.md``.

This file is the CLI and the run's order; the rest: ``servers.py`` (each server's command and
environment, started by the tests' launcher, tests/support/server.py), ``schedule.py`` (which server
runs which level, how often), ``measure.py`` (raw runs, levels, chats), ``profiling.py`` (py-spy),
``targets.py`` (the issues' targets) and ``report.py`` (the tables and docs/performance.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import client  # noqa: E402
from bench.measure import (  # noqa: E402
    RawWorker,
    best_of,
    cpu_times,
    history_turns,
    measure_chat,
    measure_level,
    run_raw,
    run_raw_llamacpp,
    steal_share,
    warm_up,
)
from bench.model import BENCH, TINY, default_models_dir, default_out, is_built  # noqa: E402
from bench.profiling import py_spy, run_profile  # noqa: E402
from bench.report import DOC, device_label, report, say, write_doc  # noqa: E402
from bench.schedule import PAIRED, faster, level_rounds, measured  # noqa: E402
from bench.servers import MALLOC_VARIANT, accelerator, base_env, gguf_file, openblas_env, plan, start  # noqa: E402
from bench.targets import level_of  # noqa: E402
from gerdsen_ai_server.runtime.blas import find_openblas  # noqa: E402
from tests.support.server import Server, stop_server  # noqa: E402

# ---------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="~2-minute smoke run: 1 and 8 streams, 32 tokens")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tests: a 2-layer hidden-64 model, 1 and 2 streams, 8 tokens, "
        "no mlx_lm.server, no profile, docs untouched unless --out",
    )
    p.add_argument("--streams", help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--batches", help="batch_generate sizes (default 4,8,16)")
    p.add_argument("--max-tokens", type=int, help="output tokens per request (default 64)")
    p.add_argument("--requests-per-stream", type=int, help="requests each stream sends, back to back (default 2)")
    p.add_argument("--min-requests", type=int, help="at least this many requests a level (default 4)")
    p.add_argument("--prompt-words", type=int, default=12, help="words per completion prompt (~2.7 tokens each)")
    p.add_argument("--history-tokens", type=int, help="multi-turn history length (default 1000)")
    p.add_argument(
        "--chat-reps",
        type=int,
        help="cold/warm pairs on our server, each on its own history (default 3; one for each mlx_lm.server)",
    )
    p.add_argument("--skip-mlx-server", action="store_true", help="do not run python -m mlx_lm.server")
    p.add_argument(
        "--skip-mlx-openblas",
        action="store_true",
        help="run mlx_lm.server only as shipped (not again with OpenBLAS, bf16 and fp32)",
    )
    p.add_argument("--skip-raw", action="store_true", help="do not measure raw in-process mlx-lm")
    p.add_argument(
        "--skip-llamacpp",
        action="store_true",
        help="no llama.cpp rows (our llama.cpp backend, llama-cpp-python's server, raw llama.cpp)",
    )
    p.add_argument("--raw-repeats", type=int, help="full raw passes (start, end); each figure the best (default 1)")
    p.add_argument(
        "--level-repeats",
        type=int,
        help="rounds of the 1- and 8-stream levels on every server and on "
        "the resident raw process; the targets take the median of the rounds' ratios (default 9)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="start, measure and stop one server at a time (default: all started, levels interleaved, "
        "so a shared machine's changing load hits every server alike)",
    )
    p.add_argument(
        "--profile",
        dest="profile",
        action="store_true",
        default=None,
        help="py-spy the engine thread during an extra 8-stream pass (default: on when py-spy is installed)",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="IMPETUS_X=VALUE",
        help="a setting for our server (repeatable), e.g. IMPETUS_ADMIT_WINDOW_MS=0 for an A/B run",
    )
    p.add_argument(
        "--skip-malloc-variant",
        action="store_true",
        help=f"on Linux, do not run our server a second time with {MALLOC_VARIANT[0]}={MALLOC_VARIANT[1]}",
    )
    p.add_argument("--model-dir", type=Path, help="bench model folder (default build/bench-model[-tiny])")
    p.add_argument("--models-dir", type=Path, help="where the default model is converted (the tokenizer source)")
    p.add_argument("--out", type=Path, help=f"markdown file to write (default {DOC.relative_to(ROOT)})")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    if args.tiny:
        defaults = dict(
            streams="1,2",
            batches="2",
            max_tokens=8,
            requests_per_stream=1,
            history_tokens=150,
            chat_reps=1,
            raw_repeats=1,
            min_requests=1,
        )
        args.skip_mlx_server = True
        args.skip_llamacpp = True
        args.skip_malloc_variant = True
        args.profile = False if args.profile is None else args.profile
        if args.out is None:
            args.no_write = True
    elif args.quick:
        defaults = dict(
            streams="1,8",
            batches="8",
            max_tokens=32,
            requests_per_stream=1,
            history_tokens=1000,
            chat_reps=1,
            raw_repeats=1,
            min_requests=4,
        )
        args.skip_mlx_openblas = True
        args.profile = False if args.profile is None else args.profile
    else:
        defaults = dict(
            streams="1,4,8,16",
            batches="4,8,16",
            max_tokens=64,
            requests_per_stream=2,
            history_tokens=1000,
            chat_reps=3,
            raw_repeats=1,
            min_requests=4,
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.level_repeats is None:
        args.level_repeats = 1 if args.tiny or args.quick else 9
    args.stream_levels = [int(s) for s in str(args.streams).split(",") if s.strip()]
    args.batch_sizes = [int(s) for s in str(args.batches).split(",") if s.strip()]
    if args.profile is None:
        args.profile = py_spy() is not None
    return args


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    if "--proxy" in given:  # its own run and options (python -m bench.overhead --help)
        from bench.overhead import main as proxy

        return proxy([a for a in given if a != "--proxy"])
    args = parse_args(argv)
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = os.environ.get("IMPETUS_BENCH_COMMAND", command.strip())
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    loads = [("start", os.getloadavg())]
    steal0 = cpu_times()
    spec = TINY if args.tiny else BENCH
    model_dir = (args.model_dir or default_out(spec)).resolve()
    models_dir = args.models_dir or default_models_dir()
    env = base_env()

    if not is_built(model_dir, spec):
        say(f"building the bench model into {model_dir} ...")
        cmd = [sys.executable, "-m", "bench.model", "--out", str(model_dir), "--models-dir", str(models_dir)]
        subprocess.run(cmd + (["--tiny"] if args.tiny else []), cwd=ROOT, env=env, check=True)
    config = json.loads((model_dir / "config.json").read_text())
    model_desc = (
        f"random llama, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads, intermediate {config['intermediate_size']}, "
        f"vocab {config['vocab_size']}, stored in {config.get('torch_dtype', '?')} (`{model_dir.name}`)"
    )
    args.turns = history_turns(args.history_tokens, model_dir / "tokenizer.json")
    logs = Path(tempfile.mkdtemp(prefix="impetus-bench-"))
    say(f"bench: {model_desc}; logs in {logs}")

    raw: dict[str, dict[str, Any]] = {}
    raw_llama: dict[str, Any] = {}
    args.gpu = accelerator(env)
    say(f"MLX computes on: {device_label(args.gpu)}")
    if not args.skip_raw and args.gpu:  # the GPU computes as stored: one reference, no BLAS to choose
        raw["bf16"] = run_raw(f"bf16 as stored, GPU ({args.gpu})", model_dir, env, "", args)
    elif not args.skip_raw:
        raw["bf16"] = run_raw("bf16 as stored, reference BLAS", model_dir, env, "", args)
        has_blas = find_openblas() is not None
        raw["fp32"] = run_raw(
            "fp32, OpenBLAS" if has_blas else "fp32, reference BLAS (no OpenBLAS)",
            model_dir,
            openblas_env(env),
            "float32",
            args,
        )
    gguf: Path | None = None
    if not args.skip_llamacpp and importlib.util.find_spec("llama_cpp") is not None:
        gguf = gguf_file(model_dir, env)
        if not args.skip_raw:
            raw_llama.update(run_raw_llamacpp(gguf, env, args))
    loads.append(("after raw", os.getloadavg()))

    servers: dict[str, dict[str, Any]] = {}
    ours_info: dict[str, Any] = {}
    runs = plan(args, env, model_dir, gguf)

    def launch(key: str, label: str, spec_env: Any) -> Server:
        server = start(key, label, spec_env, env, model_dir, models_dir, args, logs)
        if key == "ours":
            ours_info.update(server.info)
            say(
                f"  compute dtype {ours_info.get('compute_dtype')}, BLAS {ours_info.get('blas')}, "
                f"allocator {ours_info.get('allocator')}"
            )
        warm_up(server, args)
        return server

    def finish(key: str, server: Server) -> None:
        # mlx_lm.server's cold bf16 prefill of ~1,000 tokens takes ~20 s here: one pair for the peers.
        servers[key]["chat"] = measure_chat(server, args, args.chat_reps if key in ("ours", "ours llama.cpp") else 1)
        if key == "ours" and args.profile:
            # The profile pass sends 4 requests a stream: twice the 8-stream level's (or guess).
            eight = level_of(servers[key]["levels"], 8)
            expected = eight.wall * 32 / max(1, len(eight.results)) if eight else args.max_tokens / 4
            servers[key]["profile"] = run_profile(server, args, expected)
        else:
            servers[key]["profile"] = None

    worker: RawWorker | None = None
    ref = "bf16" if args.gpu else "fp32"  # the reference our server's targets use: fp32 + OpenBLAS on a CPU
    if not args.skip_raw:
        worker = RawWorker(
            raw[ref]["label"],
            model_dir,
            env if args.gpu else openblas_env(env),
            "" if args.gpu else "float32",
            args,
            logs,
        )

    def paired(n: int, round_: int) -> None:
        if worker is not None and n in PAIRED:
            worker.measure(n, round_)

    rounds: dict[str, dict[int, list[client.LevelResult]]] = {}

    def measure_round(key: str, server: Server, n: int, round_: int) -> client.LevelResult:
        level = measure_level(server, args, n, round_)
        rounds.setdefault(key, {}).setdefault(n, []).append(level)
        return level

    if args.sequential:  # start, measure, stop: one server process at a time
        for key, label, spec_env in runs:
            server = launch(key, label, spec_env)
            try:
                levels = []
                for n in args.stream_levels:
                    best = None
                    for round_ in range(level_rounds(args, n)):
                        if key == "ours":
                            paired(n, round_)
                        if measured(args, key, n, round_):
                            best = faster(best, measure_round(key, server, n, round_))
                    if best is not None:
                        levels.append(best)
                servers[key] = {"label": label, "levels": levels}
                finish(key, server)
            finally:
                stop_server(server)
            loads.append((f"after {label}", os.getloadavg()))
    else:  # all started (idle when not driven); each concurrency level runs on each server in turn
        live: dict[str, Server] = {}
        try:
            for key, label, spec_env in runs:
                live[key] = launch(key, label, spec_env)
                servers[key] = {"label": label, "levels": []}
            for n in args.stream_levels:
                best: dict[str, client.LevelResult | None] = dict.fromkeys(live)
                for round_ in range(level_rounds(args, n)):
                    paired(n, round_)
                    for key, server in live.items():
                        if measured(args, key, n, round_):
                            best[key] = faster(best[key], measure_round(key, server, n, round_))
                for key, level in best.items():
                    if level is not None:
                        servers[key]["levels"].append(level)
                loads.append((f"after {n} streams", os.getloadavg()))
            for key, server in live.items():
                finish(key, server)
            loads.append(("after the chats", os.getloadavg()))
        finally:
            for server in live.values():
                stop_server(server)
    if worker is not None:
        worker.close()
        raw[ref]["paired"] = {**worker.best(), "rounds": worker.rounds}
    for key in servers:
        servers[key]["rounds"] = rounds.get(key, {})

    if "fp32" in raw and args.raw_repeats > 1:  # again at the end: each figure is the best of the passes
        for _ in range(args.raw_repeats - 1):
            for key in ["fp32"]:  # the reference for our server's targets (bf16 is slow and informational)
                again = run_raw(
                    raw[key]["label"],
                    model_dir,
                    openblas_env(env) if key == "fp32" else env,
                    "float32" if key == "fp32" else "",
                    args,
                )
                raw[key] = best_of(raw[key], again)
        loads.append(("after raw again", os.getloadavg()))

    body = report(
        args,
        command,
        started,
        loads,
        raw,
        servers,
        ours_info,
        time.monotonic() - t0,
        model_desc,
        raw_llama,
        steal_share(steal0, cpu_times()),
    )
    print()
    print(body)
    if not args.no_write:
        out = args.out or DOC
        write_doc(out, body, args.gpu)
        say(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
