"""Prompt-prefix reuse: the KV caches of finished sequences, found again by a later prompt's prefix.

One LRU for every resident model, keyed by model and token prefix (mlx-lm's ``LRUPromptCache``
with the faster search of mlxlm.py), bounded by IMPETUS_PROMPT_CACHE_BYTES. The MLX backend asks
it at each admission (``lookup``) and hands it the caches of the sequences a step finished
(``keep``); the engine stores them between steps (``store``). llama.cpp keeps its own prefixes in
its KV slots (backends/llamacpp.py).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from gerdsen_ai_server.engine.mlxlm import PromptCache
from gerdsen_ai_server.engine.stats import EngineStats


class PrefixCache:
    """The engine's prompt cache and the finished caches still to store in it (engine thread only)."""

    def __init__(self, max_bytes: int, stats: EngineStats) -> None:
        # KV caches of finished sequences, keyed by model and token prefix (mlx-lm's own LRU trie).
        self.lru = PromptCache(max_size=1 << 20, max_bytes=max_bytes)
        self.enabled = max_bytes > 0
        self._stats = stats
        # Finished sequences' KV caches still to store there (model id, tokens, cache): see store.
        self._unstored: list[tuple[str, list[int], list[Any]]] = []

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes  # type: ignore[no-any-return]

    @property
    def pending(self) -> bool:
        """Whether finished caches wait to be stored (they are stored after the answers go out)."""
        return bool(self._unstored)

    def lookup(self, model_id: str, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """The KV cache of the longest cached prefix of ``prompt`` and the tokens still to process."""
        if not self.enabled:
            return None, prompt
        cache, rest = self.lru.fetch_nearest_cache(model_id, prompt)
        if cache is not None and not rest:
            # The whole prompt is cached: step back one token so there is something to feed.
            if not can_trim_prompt_cache(cache):
                cache, rest = None, prompt
            else:
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
        if cache is None:
            self._stats.prompt_cache_misses_total += 1
            return None, prompt
        self._stats.prompt_cache_hits_total += 1
        return cache, rest

    def keep(self, model_id: str, finished: list[tuple[list[int], list[Any] | None]]) -> None:
        """The (tokens, KV cache) of sequences that just finished, to store later (``store``)."""
        if self.enabled:
            self._unstored += [(model_id, tokens, cache) for tokens, cache in finished if cache is not None and tokens]

    def store(self, count: int | None) -> None:
        """Store ``count`` (None: all) of the finished sequences' KV caches in the prompt cache.

        An extracted cache is a lazy copy out of the whole batch's KV buffers: evaluated, or the LRU
        would keep every batch buffer it was cut from alive (measured: +50 MB a request). The copies
        take MLX time (~10 ms for 8 sequences of ~100 tokens of the bench model on 2 CPU cores,
        25-40 ms while the HTTP threads answer), so they never delay the step's events (the MLX
        backend's step), and while nothing decodes they go one sequence per engine-loop turn, so
        that requests arriving meanwhile are received and held (admission.py) instead of waiting
        on MLX. All that is left goes in one evaluation before a step or an admission: a request
        finds the cache of every request answered before it.
        """
        stored = self._unstored[:count]
        if not stored:
            return
        mx.eval([c.state for _, _, cache in stored for c in cache])
        for model_id, tokens, cache in stored:
            self.lru.insert_cache(model_id, list(tokens), cache)
        del self._unstored[: len(stored)]  # only now: until stored, they count as pending

    def forget(self, model_id: str) -> None:
        """An unloaded model's prompt caches go with it (registry.unload, on the engine thread)."""
        self._unstored = [item for item in self._unstored if item[0] != model_id]
        self.lru.drop_model(model_id)
