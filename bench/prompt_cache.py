"""What one prompt-cache lookup costs the engine thread as the cache fills: mlx-lm's LRUPromptCache
against ours (engine/mlxlm.py, the same LRU with a trie search that costs the prompt's length).

    .venv/bin/python -m bench.prompt_cache

Entries are the bench model's KV caches (8 layers, 8 KV heads of 64, float32: 32 KiB a token) of
100-token answers that share their first 5 tokens, as the bench's prompts and chat templates do; the
lookup is a new prompt sharing those 5 tokens. 80 entries fill the default 256 MiB, 320 fill 1 GiB.
Each time is the median of 20 lookups (``fetch_nearest_cache``: the trie search, then the copy of
the KV it reuses).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import KVCache, LRUPromptCache

from gerdsen_ai_server.engine.mlxlm import PromptCache

SHARED = [1393, 587, 216, 37, 29]


def kv_cache(tokens: int, layers: int = 8) -> list[KVCache]:
    caches = []
    for _ in range(layers):
        cache = KVCache()
        cache.keys, cache.values = mx.zeros((1, 8, tokens, 64)), mx.zeros((1, 8, tokens, 64))
        cache.offset = tokens
        caches.append(cache)
    mx.eval([c.state for c in caches])
    return caches


def lookup_ms(cache: LRUPromptCache, rng: random.Random, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        prompt = SHARED + [rng.randrange(2048) for _ in range(30)]
        start = time.perf_counter()
        found, _ = cache.fetch_nearest_cache("m", prompt)
        if found is not None:
            mx.eval([c.state for c in found])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="16,64,160,320")
    args = parser.parse_args()
    print("| cached entries | mlx-lm LRUPromptCache ms | ours ms |")
    print("|---|---|---|")
    for entries in (int(n) for n in args.entries.split(",")):
        row = []
        for cls in (LRUPromptCache, PromptCache):
            rng = random.Random(entries)
            cache = cls(max_size=1 << 20, max_bytes=1 << 40)
            for _ in range(entries):
                cache.insert_cache("m", SHARED + [rng.randrange(2048) for _ in range(95)], kv_cache(100))
            row.append(lookup_ms(cache, rng))
        print(f"| {entries} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
