"""4-bit kept vs dequantized to float32 on this CPU: decode tok/s, and the registry's estimate vs resident memory.

    python -m bench.quant_dtype --sizes small,medium [--extra FOLDER_OR_GGUF ...]
        [--dtypes none,quantized-float32,float32] [--reps 2] [--tokens 24]

Builds random-weight llamas (bench/model.py's recipe, larger shapes) in bfloat16 and a 4-bit copy of
each with mlx-lm's own ``convert`` (no hub; bfloat16 scales, as mlx-community's repos have), then,
each load in a fresh process so memory figures do not mix, loads every folder through our loader
(``LoaderFactory``) in each dtype (engine/dtype.py: ``none`` as stored, ``quantized-float32`` the
quantized weights with float32 scales and layers, ``float32`` dequantized), interleaved over
``--reps`` rounds, and decodes ``--tokens`` tokens greedily, one sequence (mlx-lm's
``generate_step``). A ``.gguf`` given with ``--extra`` loads on llama.cpp (memory only). Prints one
JSON line per run and a table: tok/s, the registry's estimate (``LoaderFactory.estimate_bytes``),
MLX's active memory after the load (the arrays the model holds: what the registry counts) and the
process RSS delta (what the OS sees, the tokenizer included), each run under the server's C
allocator (jemalloc where installed) and BLAS (OpenBLAS), as runtime/ sets them up. Figures:
docs/performance.md, "Quantized stays quantized".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.model import Spec, build, default_models_dir  # noqa: E402
from gerdsen_ai_server.runtime.blas import preload_env  # noqa: E402
from gerdsen_ai_server.runtime.memory import allocator_env  # noqa: E402

SIZES = {
    # ~0.1 B parameters: hidden 768, 12 layers (GPT-2 small's shape), SmolLM2's 49k vocabulary cut to 32k
    "small": Spec(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32768, context=4096),
    # ~0.45 B: hidden 1536, 16 layers (Qwen2.5-0.5B's width)
    "medium": Spec(hidden=1536, layers=16, heads=12, kv_heads=2, intermediate=4096, vocab=32768, context=4096),
}


def folders(name: str, spec: Spec) -> tuple[Path, Path]:
    """The bf16 folder and its 4-bit copy, built once under build/."""
    from mlx_lm import convert

    bf16 = build(ROOT / "build" / f"quant-{name}", spec, default_models_dir(), quiet=True)
    q4 = ROOT / "build" / f"quant-{name}-4bit"
    if not (q4 / "config.json").is_file():
        convert(str(bf16), str(q4), quantize=True, q_bits=4, q_group_size=64)
        for extra in bf16.iterdir():  # the tokenizer and stamp files convert may not copy
            if not (q4 / extra.name).exists() and extra.suffix != ".safetensors":
                (q4 / extra.name).write_bytes(extra.read_bytes())
    return bf16, q4


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def one(path: Path, dtype: str | None, tokens: int) -> dict[str, object]:
    """Load ``path`` as ``dtype`` in this process and decode; the figures of one run."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from gerdsen_ai_server.engine.formats.loaders import LoaderFactory

    factory = LoaderFactory()
    if path.suffix == ".gguf":
        return one_gguf(path)
    estimate = factory.estimate_bytes(path, dtype)
    mx.eval(mx.zeros(1))
    before_rss, before_active = rss(), mx.get_active_memory()
    loaded = factory.load(str(path), path.parent, dtype, trusted=True)
    mx.clear_cache()
    time.sleep(1.5)  # jemalloc gives pages unused for 1 s back (runtime/memory.py's MALLOC_CONF)
    active = mx.get_active_memory() - before_active
    resident = rss() - before_rss
    prompt = mx.array([5 + i % 1000 for i in range(32)])
    best = 0.0
    for _ in range(2):
        start, n = 0.0, 0
        for n, _ in enumerate(generate_step(prompt, loaded.model, max_tokens=tokens + 1)):
            if n == 0:
                start = time.perf_counter()  # after the prefill and the first token
        best = max(best, n / (time.perf_counter() - start))
    return {
        "model": path.name,
        "dtype": dtype or "as stored",
        "tok_s": round(best, 2),
        "estimate": estimate,
        "active": active,
        "rss_delta": resident,
        "nbytes": loaded.nbytes,
    }


def one_gguf(path: Path) -> dict[str, object]:
    """A GGUF on llama.cpp (IMPETUS_BACKEND=llamacpp): the registry's estimate (the file and the KV cache of
    IMPETUS_MAX_BATCH slots of the context) against the RSS the load adds, after one short prompt."""
    from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
    from gerdsen_ai_server.engine.options import BackendOptions

    factory = LoaderFactory(BackendOptions(backend="llamacpp"))
    estimate = factory.estimate_bytes(path, None)
    before = rss()
    loaded = factory.load(str(path), path.parent, None, trusted=True)
    time.sleep(1.5)
    return {
        "model": path.name,
        "dtype": "as stored",
        "tok_s": 0.0,
        "estimate": estimate,
        "active": 0,
        "rss_delta": rss() - before,
        "nbytes": loaded.nbytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=2, help="rounds over every (model, dtype), interleaved")
    p.add_argument(
        "--dtypes",
        default="none,quantized-float32,float32",
        help="as stored (none), quantized weights with float32 scales and layers, dequantized float32",
    )
    p.add_argument("--extra", action="append", default=[], help="another MLX folder to measure (the default model)")
    p.add_argument("--one", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        path, dtype = args.one
        print(json.dumps(one(Path(path), None if dtype == "none" else dtype, args.tokens)), flush=True)
        return
    paths = [Path(e) for e in args.extra]
    for name in filter(None, args.sizes.split(",")):
        paths.extend(folders(name, SIZES[name]))
    rows = []
    runs = [(path, dtype) for path in paths for dtype in args.dtypes.split(",")]
    for path, dtype in [run for _ in range(args.reps) for run in runs]:
        if path.suffix == ".gguf" and dtype != "none":
            continue
        if dtype == "quantized-float32" and "quantization" not in json.loads((path / "config.json").read_text()):
            continue  # nothing quantized to keep
        command = [sys.executable, "-m", "bench.quant_dtype", "--one", str(path), dtype, "--tokens", str(args.tokens)]
        env = allocator_env(preload_env(dict(os.environ)))  # the server's: jemalloc, OpenBLAS
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        out = done.stdout.strip().splitlines()[-1]
        print(out, flush=True)
        rows.append(json.loads(out))
    head = f"{'model':32} {'dtype':17} {'tok/s':>6} {'estimate MB':>11} {'active MB':>9} {'RSS d MB':>8}"
    print(f"{head} {'est/act':>7} {'est/RSS':>7}")
    for r in rows:
        active = r["estimate"] / r["active"] if r["active"] else float("nan")
        print(
            f"{r['model']:32} {r['dtype']:17} {r['tok_s']:6.1f} {r['estimate'] / 1e6:11.1f} "
            f"{r['active'] / 1e6:9.1f} {r['rss_delta'] / 1e6:8.1f} {active:7.3f} {r['estimate'] / r['rss_delta']:7.3f}"
        )


if __name__ == "__main__":
    main()
