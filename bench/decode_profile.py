"""Where a decode step of the embedded default model goes on the MLX CPU path, and what compiling it buys (issue 28).

    python -m bench.decode_profile                    # ~6-8 min on 2 cores: profile, then the A/B rounds
    python -m bench.decode_profile --rounds 6 --no-engine

The default model (SmolLM2-135M-Instruct, 30 layers) loaded as our engine loads it on a CPU (loaders.py,
float32, OpenBLAS preloaded: the module re-executes itself with ``LD_PRELOAD`` set when it is not). Prints:

- the profile of one step at one stream: the whole step, the 30 blocks alone, the output projection
  (hidden x 49,152 vocabulary) alone; the weight bytes a step reads and the rate that implies; the graph
  nodes one step evaluates, by primitive, plain and compiled (engine/compiled.py); and the "dispatch
  floor": the same architecture at toy widths (hidden 64), whose step costs the nodes and no bytes.
- interleaved steps: plain and compiled decode steps in turn on one cache (A B B A ...), at 1 and 8
  streams; the median ratio of neighbouring steps cancels the drift of a shared machine's load, which
  the whole-run figures below do not (the figure to judge the lever by).
- A/B rounds, alternating plain (A) and compiled (B) on one loaded model: raw mlx-lm decode at one
  stream (``generate_step``, what ``stream_generate`` runs) and ``BatchGenerator`` at 8 streams (no stop
  tokens), ms per step, wall and process CPU time (CPU time suffers less from the shared cores), and
  whether the greedy tokens are identical; then our engine in process at 1 and 8 streams, both ways.
  The medians of the rounds, with the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STORY = "Once upon a time, in a small village by the sea, there lived an old clockmaker who"


def ensure_openblas() -> None:
    """Re-exec with OpenBLAS preloaded (as ``impetus serve`` runs), which must be set before MLX loads."""
    from gerdsen_ai_server.runtime.blas import preload_env

    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    env = preload_env(dict(os.environ))
    if "openblas" in env.get("LD_PRELOAD", ""):
        os.execve(sys.executable, [sys.executable, "-m", "bench.decode_profile", *sys.argv[1:]], env)


def load_default(models_dir: Path) -> tuple[Any, Any]:
    from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
    from gerdsen_ai_server.engine.options import BackendOptions
    from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID

    loaded = LoaderFactory(BackendOptions(backend="mlx")).load(DEFAULT_MODEL_ID, models_dir, "float32", trusted=True)
    return loaded.model, loaded.tokenizer


def median_ms(fn: Callable[[], Any], reps: int = 15, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def one_stream(model: Any, prompt: list[int], steps: int) -> dict[str, Any]:
    """mlx-lm's ``generate_step`` (``stream_generate``'s loop), timed from its first token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens: list[int] = []
    wall = cpu = 0.0
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=steps + 1):
        if not tokens:
            wall, cpu = time.perf_counter(), time.process_time()
        tokens.append(int(token))
    return {
        "wall": (time.perf_counter() - wall) / steps * 1e3,
        "cpu": (time.process_time() - cpu) / steps * 1e3,
        "tokens": tokens,
    }


def batch(model: Any, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """mlx-lm's ``BatchGenerator`` on ``prompts`` together, no stop tokens; timed from the first step's tokens."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert(prompts, max_tokens=[steps + 1] * len(prompts))
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    wall = cpu = 0.0
    done = 0
    while done < len(prompts):
        responses = gen.next_generated()
        if not wall:
            wall, cpu = time.perf_counter(), time.process_time()
        for r in responses:
            out[r.uid].append(r.token)
            done += r.finish_reason is not None
    gen.close()
    return {
        "wall": (time.perf_counter() - wall) / steps * 1e3,
        "cpu": (time.process_time() - cpu) / steps * 1e3,
        "tokens": [out[uid] for uid in uids],
    }


def interleaved(model: Any, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """Plain and compiled steps taken in turn on one batch's cache (A B B A ...), so that each pair of
    neighbours ran under the same load; greedy, synchronous (no overlap with the next step's graph).
    The median over the pairs of B's time / A's, wall and CPU, and each arm's median ms."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from gerdsen_ai_server.engine.compiled import compile_decode, uncompile_decode

    width = min(len(p) for p in prompts)
    rows = [p[:width] for p in prompts]
    # mlx-lm's one-stream cache (an int offset) for one prompt, the batch cache (an array offset) for more
    cache = make_prompt_cache(model) if len(rows) == 1 else [BatchKVCache([0] * len(rows)) for _ in model.layers]
    logits = model(mx.array(rows), cache=cache)
    token = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(token)
    times: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for i in range(2 * steps):
        arm = "AB"[(i + i // 2) % 2]  # A B B A A B B A ...
        if arm == "B":
            compile_decode(model)
        wall, cpu = time.perf_counter(), time.process_time()
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
        times[arm].append((time.perf_counter() - wall, time.process_time() - cpu))
        uncompile_decode(model)
    pairs = list(zip(times["A"][1:], times["B"][1:], strict=True))  # the first of each: warm-up
    return {
        "A": statistics.median(a[0] for a in times["A"][1:]) * 1e3,
        "B": statistics.median(b[0] for b in times["B"][1:]) * 1e3,
        "wall": statistics.median(b[0] / a[0] for a, b in pairs),
        "cpu": statistics.median(b[1] / a[1] for a, b in pairs if a[1] > 0),
    }


def graph_nodes(model: Any, prompt: list[int]) -> Counter[str]:
    """The primitives one decode step's graph evaluates (``mx.export_to_dot``), by kind."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    buf = io.StringIO()
    mx.export_to_dot(buf, model(mx.array([prompt[-1:]]), cache=cache))
    return Counter(re.findall(r'label ="([A-Za-z]+)"', buf.getvalue()))


def profile(model: Any, prompt: list[int]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    from gerdsen_ai_server.engine.formats.safetensors import parameter_nbytes

    def stepper(m: Any, body: bool = False) -> Callable[[], None]:
        cache = make_prompt_cache(m)
        mx.eval(m(mx.array([prompt]), cache=cache))
        one = mx.array([prompt[-1:]])
        fn = m.model if body else m

        def step() -> None:
            mx.eval(fn(one, cache=cache))
            for c in cache:
                c.trim(1)  # the same context length every rep

        return step

    h = mx.random.normal((1, 1, model.args.hidden_size))
    embed = model.model.embed_tokens
    mx.eval(h)
    toy = llama.Model(dataclasses.replace(model.args, hidden_size=64, intermediate_size=64, head_dim=8, vocab_size=64))
    mx.eval(toy.parameters())
    weights = parameter_nbytes(model)
    head = embed.weight.nbytes
    step = median_ms(stepper(model))
    return {
        "step": step,
        "body": median_ms(stepper(model, body=True)),
        "head": median_ms(lambda: mx.eval(embed.as_linear(h))),
        "toy": median_ms(stepper(toy)),
        "weights_mb": weights / 1e6,
        "head_mb": head / 1e6,
    }


def engine_rates(models_dir: Path, streams: int, steps: int, seed: int) -> float:
    """Our engine in process (the default model on MLX): aggregate decode tok/s of ``streams`` requests."""
    from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams

    eng = _ENGINE["engine"]
    tok = _ENGINE["tokenizer"]
    no_eos = {t: -1e9 for t in tok.eos_token_ids}
    reqs = [
        GenerationRequest(
            model=_ENGINE["id"],
            prompt_tokens=tok.encode(f"{STORY} ({seed}-{i})"),
            max_tokens=steps + 1,
            sampling=SamplingParams(temperature=0.0, logit_bias=no_eos),
        )
        for i in range(streams)
    ]
    import threading

    marks: list[tuple[float, float, int]] = []

    def read(stream: Any) -> None:
        first = last = 0.0
        count = 0
        for event in stream:
            if event.token_ids:
                last = time.perf_counter()
                first = first or last
                count += len(event.token_ids)
        marks.append((first, last, count))

    threads = [threading.Thread(target=read, args=(eng.submit(r),)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    decoded = sum(m[2] - 1 for m in marks)  # each stream's first token comes from its prefill
    return decoded / (max(m[1] for m in marks) - min(m[0] for m in marks))


_ENGINE: dict[str, Any] = {}


def start_engine(models_dir: Path) -> Any:
    from gerdsen_ai_server.engine.engine import InferenceEngine
    from gerdsen_ai_server.engine.options import EngineOptions
    from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID

    eng = InferenceEngine(EngineOptions(models_dir, max_batch=8, backend="mlx", compute_dtype="float32"))
    eng.start()
    eng.load_model(DEFAULT_MODEL_ID).result(timeout=600)
    loaded = eng.get_model(DEFAULT_MODEL_ID)
    _ENGINE.update(engine=eng, tokenizer=loaded.tokenizer, id=DEFAULT_MODEL_ID, model=loaded.model)
    return eng


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "build" / "test-models")
    parser.add_argument("--steps", type=int, default=64, help="decode steps a run (default 64)")
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds (default 4)")
    parser.add_argument("--no-engine", action="store_true", help="skip our engine's rows")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    args = parser.parse_args(argv)
    ensure_openblas()
    from gerdsen_ai_server.engine.compiled import compile_decode, uncompile_decode
    from gerdsen_ai_server.runtime.blas import blas_in_use

    model, tokenizer = load_default(args.models_dir)
    uncompile_decode(model)  # the loader compiled it: A (plain) is the state every arm starts from
    prompt = tokenizer.encode(STORY)
    prompts = [tokenizer.encode(f"{STORY} ({i})") for i in range(8)]
    print(f"# default model, float32, BLAS {blas_in_use()}; {load()}", flush=True)
    if not args.no_profile:
        p = profile(model, prompt)
        gbs = p["weights_mb"] / p["step"]
        print(f"step (1 stream)       {p['step']:7.1f} ms   {p['weights_mb']:.0f} MB of weights: {gbs:.1f} GB/s")
        print(f"  30 blocks alone     {p['body']:7.1f} ms")
        print(f"  output projection   {p['head']:7.1f} ms   {p['head_mb']:.0f} MB: {p['head_mb'] / p['head']:.1f} GB/s")
        print(f"dispatch floor (toy)  {p['toy']:7.1f} ms   the same graph at hidden 64")
        plain = graph_nodes(model, prompt)
        compile_decode(model)
        fused = graph_nodes(model, prompt)
        uncompile_decode(model)
        print(f"graph nodes a step: plain {sum(plain.values())}, compiled {sum(fused.values())}")
        print("  plain:   ", ", ".join(f"{k} {v}" for k, v in plain.most_common(12)))
        print("  compiled:", ", ".join(f"{k} {v}" for k, v in fused.most_common(8)), f"; {load()}", flush=True)
    if args.rounds:
        print(f"interleaved steps (A B B A ...), {args.steps} pairs a run; {load()}")
        for _ in range(args.rounds):
            for n in (1, 8):
                r = interleaved(model, prompts[:n], args.steps)
                print(
                    f"  {n} stream(s): plain {r['A']:6.1f} ms  compiled {r['B']:6.1f} ms  median pair ratio "
                    f"wall {r['wall']:.3f} cpu {r['cpu']:.3f} ({(1 / r['wall'] - 1) * 100:+.0f} % tok/s); {load()}",
                    flush=True,
                )
        ab(model, prompt, prompts, args)
    if args.rounds and not args.no_engine:
        del model
        ab_engine(args)
    return 0


def ab(model: Any, prompt: list[int], prompts: list[list[int]], args: argparse.Namespace) -> None:
    from gerdsen_ai_server.engine.compiled import compile_decode, uncompile_decode

    rows: dict[str, list[float]] = {}
    ref1, ref8 = one_stream(model, prompt, args.steps)["tokens"], batch(model, prompts, args.steps)["tokens"]
    same = True
    print(f"A/B raw mlx-lm, {args.steps} steps; {load()}", flush=True)
    for rnd in range(args.rounds):
        for arm in ("A", "B"):
            if arm == "B":
                compile_decode(model)
            one, eight = one_stream(model, prompt, args.steps), batch(model, prompts, args.steps)
            uncompile_decode(model)
            same &= one["tokens"] == ref1 and eight["tokens"] == ref8
            for name, r in (("1", one), ("8", eight)):
                rows.setdefault(f"{arm}{name} wall", []).append(r["wall"])
                rows.setdefault(f"{arm}{name} cpu", []).append(r["cpu"])
            print(
                f"  round {rnd} {arm}: 1 stream {one['wall']:.1f} ms ({one['cpu']:.1f} cpu), "
                f"8 streams {eight['wall']:.1f} ms ({eight['cpu']:.1f} cpu); {load()}",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in rows.items()}
    for n in ("1", "8"):
        for kind in ("wall", "cpu"):
            a, b = med[f"A{n} {kind}"], med[f"B{n} {kind}"]
            print(f"{n} stream(s) {kind:4} ms/step: plain {a:6.1f}  compiled {b:6.1f}  ({(a / b - 1) * 100:+.0f} %)")
    print(f"greedy tokens identical: {same}; {load()}", flush=True)


def ab_engine(args: argparse.Namespace) -> None:
    from gerdsen_ai_server.engine.compiled import compile_decode, uncompile_decode

    eng = start_engine(args.models_dir)
    model = _ENGINE["model"]
    uncompile_decode(model)  # the loader compiled it
    rates: dict[str, list[float]] = {}
    try:
        engine_rates(args.models_dir, 1, 8, 0)  # warm up
        for rnd in range(args.rounds):
            for arm in ("A", "B"):
                if arm == "B":
                    compile_decode(model)  # between requests: the engine thread is idle
                for n in (1, 8):
                    rates.setdefault(f"{arm}{n}", []).append(engine_rates(args.models_dir, n, args.steps, rnd * 10 + n))
                uncompile_decode(model)
                print(
                    f"  engine round {rnd} {arm}: 1 stream {rates[f'{arm}1'][-1]:.1f} tok/s, "
                    f"8 streams {rates[f'{arm}8'][-1]:.1f} tok/s; {load()}",
                    flush=True,
                )
    finally:
        eng.shutdown()
    for n in (1, 8):
        a, b = statistics.median(rates[f"A{n}"]), statistics.median(rates[f"B{n}"])
        print(f"our engine, {n} stream(s) tok/s: plain {a:6.1f}  compiled {b:6.1f}  ({(b / a - 1) * 100:+.0f} %)")


if __name__ == "__main__":
    sys.exit(main())
