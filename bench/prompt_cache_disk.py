"""What the prompt cache's disk tier costs and gives (engine/prompt_cache_disk.py, issue 27 item 3).

    .venv/bin/python -m bench.prompt_cache_disk [--tokens 1000 4000] [--restart-words 700]

Per entry, at the bench model's KV shape (8 layers, 8 KV heads of 64, float32: 32 KiB a token):
the engine thread's part of a write (``put``: the header, the hand-off), the writer thread's
(``mx.save_safetensors`` and the rename), and a read (header, tokens and shapes checked, the arrays
loaded by mlx-lm's ``load_prompt_cache`` and evaluated), all on the engine thread.

Then, with ``--restart-words N`` (0: skip), the first request's time to first token on our server
(the bench model, a prompt of N words, about 5.8 tokens a word): cold, then after a restart on
the same models folder with IMPETUS_PROMPT_CACHE_DISK_BYTES set, served from the disk tier.

With ``--llamacpp-tokens N`` (0: skip), the same on llama.cpp in-process (the default model's GGUF,
one slot, 2 threads): a prompt of N tokens cold, then in a new engine from the disk tier, and what
saving the slot (``llama_state_seq_get_data``, the backend's thread) and restoring it cost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import requests
from mlx_lm.models.cache import KVCache

from bench.model import BENCH, build, default_out
from gerdsen_ai_server.engine.prompt_cache_disk import DiskTier
from gerdsen_ai_server.engine.prompt_cache_format import TierKey
from tests.support.server import Server, start_server, stop_server

KEY = TierKey("bench", "weights", "float32", 0)
LAYERS = 8


def entry_costs(tokens: int, folder: Path) -> str:
    tier = DiskTier(folder, 8 << 30, queue_bytes=4 << 30)
    cache = []
    for _ in range(LAYERS):
        layer = KVCache()
        layer.keys, layer.values = mx.random.normal((1, 8, tokens, 64)), mx.random.normal((1, 8, tokens, 64))
        layer.offset = tokens
        cache.append(layer)
    mx.eval([c.state for c in cache])
    ids = list(range(tokens))
    started = time.perf_counter()
    tier.put(KEY, ids, cache)
    handed = time.perf_counter()
    tier.flush(600)
    written = time.perf_counter()
    name, _ = tier.best(KEY, ids) or ("", 0)
    read = tier.read(KEY, name, ["KVCache"] * LAYERS)
    done = time.perf_counter()
    assert read is not None
    return (
        f"{tokens} tokens, {tier.nbytes / 1e6:.1f} MB: put (engine thread) {1e3 * (handed - started):.1f} ms, "
        f"write (writer thread) {1e3 * (written - handed):.0f} ms, read (engine thread) {1e3 * (done - written):.0f} ms"
    )


def first_token_seconds(server: Server, prompt: str) -> float:
    body = {"model": "bench-model", "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with requests.post(server.base_url + "/completions", json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text"):
                return time.perf_counter() - started
    raise RuntimeError("no token came")


def restart(words: int, folder: Path) -> str:
    models = folder / "models"
    models.mkdir()
    (models / "bench-model").symlink_to(build(default_out(BENCH), BENCH, quiet=True), target_is_directory=True)
    names = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
    prompt = " ".join(f"{names.split()[i % 19]}{i}" for i in range(words))
    env = {
        "IMPETUS_MODELS_DIR": str(models),
        "IMPETUS_DEFAULT_MODEL": str(models / "bench-model"),
        "IMPETUS_PROMPT_CACHE_DISK_BYTES": str(2 << 30),
    }
    times = []
    for run in range(2):
        server = start_server(folder, **env)
        try:
            times.append(first_token_seconds(server, prompt))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # written through after the answer
                tiers = requests.get(server.url + "/health", timeout=10).json()["prompt_cache_tiers"]
                if tiers["disk"]["writes"] or run:
                    break
                time.sleep(0.1)
            hits = tiers["disk"]["hits"]
        finally:
            stop_server(server)
    cold, warm = times
    return (
        f"first request, {words} words: cold {cold:.2f} s, after a restart {warm:.2f} s from the disk tier "
        f"({hits} disk hit), {cold / warm:.1f}x"
    )


def llamacpp_restart(tokens: int, folder: Path) -> str:
    from gerdsen_ai_server.engine.backends import llamacpp_state
    from gerdsen_ai_server.engine.engine import InferenceEngine
    from gerdsen_ai_server.engine.options import EngineOptions
    from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
    from tests.support import DEFAULT_MODEL

    spent: dict[str, float] = {}
    for name in ("save", "restore"):
        original = getattr(llamacpp_state.SlotFiles, name)

        def timed(self: object, *args: object, _original: object = original, _name: str = name) -> object:
            started = time.perf_counter()
            result = _original(self, *args)  # type: ignore[operator]
            spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - started
            return result

        setattr(llamacpp_state.SlotFiles, name, timed)
    options = EngineOptions(
        folder,
        backend="llamacpp",
        max_batch=1,
        context_length=tokens + 64,
        llamacpp_threads=2,
        prompt_cache_disk_bytes=1 << 30,
    )
    firsts, answers = [], []
    for run in range(2):
        engine = InferenceEngine(options)
        engine.start()
        engine.load_model(DEFAULT_MODEL).result(timeout=300)
        request = GenerationRequest(
            model=DEFAULT_MODEL,
            prompt_tokens=list(range(300, 300 + tokens)),
            max_tokens=4,
            sampling=SamplingParams(temperature=0),
        )
        started, first, answer = time.perf_counter(), 0.0, []
        for event in engine.submit(request):
            first = first or (time.perf_counter() - started if event.token_ids else 0.0)
            answer += event.token_ids
        firsts.append(first)
        answers.append(answer)
        disk = engine.prompt_cache.disk
        deadline = time.monotonic() + 60
        while run == 0 and not disk.writes and time.monotonic() < deadline:
            time.sleep(0.02)
        engine.unload_model(DEFAULT_MODEL).result(timeout=60)
        engine.shutdown()
    return (
        f"llama.cpp, {tokens} tokens, {disk.nbytes / 1e6:.1f} MB file: save (backend thread) {1e3 * spent['save']:.0f} ms, "
        f"restore {1e3 * spent['restore']:.0f} ms; first token cold {firsts[0]:.2f} s, in a new engine from disk "
        f"{firsts[1]:.2f} s ({firsts[0] / firsts[1]:.1f}x, {disk.hits} disk hit), same answer: {answers[0] == answers[1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[1000, 4000])
    parser.add_argument("--restart-words", type=int, default=700)
    parser.add_argument("--llamacpp-tokens", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.tokens:
            print(entry_costs(n, Path(tmp) / f"entries-{n}"))
        if args.restart_words:
            print(restart(args.restart_words, Path(tmp)))
        if args.llamacpp_tokens:
            (Path(tmp) / "llamacpp").mkdir()
            print(llamacpp_restart(args.llamacpp_tokens, Path(tmp) / "llamacpp"))


if __name__ == "__main__":
    main()
