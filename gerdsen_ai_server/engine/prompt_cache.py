"""Prompt-prefix reuse: the KV caches of finished sequences, found again by a later prompt's prefix.

Three tiers (the design's L1/L2/L3): L1 is the live KV cache of the running batch (its bytes are
reported, ``MLXBackend.kv_bytes``); L2 one LRU in RAM for every resident model, keyed by model and
token prefix (mlx-lm's ``LRUPromptCache`` with the faster search of mlxlm.py), bounded by
IMPETUS_PROMPT_CACHE_BYTES; L3 files on disk (prompt_cache_disk.py) bounded by
IMPETUS_PROMPT_CACHE_DISK_BYTES, written through as L2 stores, read when they cover more of a
prompt than L2 does (then kept in L2 too). The MLX backend asks at each admission (``lookup``) and
hands over the caches of the sequences a step finished (``keep``); the engine stores them between
steps (``store``). llama.cpp keeps its own prefixes in its KV slots (backends/llamacpp.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import QuantizedKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.mlxlm import PromptCache
from gerdsen_ai_server.engine.prompt_cache_disk import DISK_MIN_GAIN as DISK_MIN_GAIN
from gerdsen_ai_server.engine.prompt_cache_disk import DiskTier
from gerdsen_ai_server.engine.prompt_cache_format import TierKey, weights_fingerprint
from gerdsen_ai_server.engine.stats import EngineStats

log = logging.getLogger(__name__)

DISK_FOLDER = ".prompt-cache"  # under the models dir (store/local.py skips dot folders)


class _Live(Protocol):
    @property
    def kv_bytes(self) -> int: ...


@dataclass
class TierStats:
    """One tier's counters (plain ints: read from any thread)."""

    hits: int = 0
    misses: int = 0
    bytes: int = 0
    limit_bytes: int = 0
    entries: int = 0
    writes: int = 0  # disk: files written
    rejected: int = 0  # disk: files refused and deleted (corrupt, truncated, mismatched)
    skipped: int = 0  # disk: caches not written (a cache class mlx-lm cannot load back, the writer behind)


@dataclass
class _Model:
    key: TierKey
    layout: list[str]  # its cache classes, one per layer: a file must have the same


def _portable(layer: Any) -> Any:
    """A layer as mlx-lm's own class, which its loader finds by name: the batched quantized cache's
    ``QuantizedCache`` (quantized_cache.py) is a ``QuantizedKVCache`` with the same state."""
    if isinstance(layer, QuantizedKVCache) and type(layer) is not QuantizedKVCache:
        return QuantizedKVCache.from_state(layer.state)
    return layer


def model_dtype(model: Any) -> str:
    """The dtype the model computes in: its first floating parameter's (a quantized model's scales)."""
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for _, value in flat:
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).removeprefix("mlx.core.")
    return "unknown"


class PrefixCache:
    """The engine's prompt cache and the finished caches still to store in it (engine thread only)."""

    def __init__(self, max_bytes: int, stats: EngineStats, models_dir: Path | None = None, disk_bytes: int = 0) -> None:
        # KV caches of finished sequences, keyed by model and token prefix (mlx-lm's own LRU trie).
        self.lru = PromptCache(max_size=1 << 20, max_bytes=max_bytes)
        self.enabled = max_bytes > 0
        self._stats = stats
        # Finished sequences' KV caches still to store there (model id, tokens, cache): see store.
        self._unstored: list[tuple[str, list[int], list[Any]]] = []
        self.ram = TierStats(limit_bytes=max_bytes)
        folder = (models_dir or Path(".")) / DISK_FOLDER
        self.disk = DiskTier(folder, disk_bytes if models_dir is not None and max_bytes > 0 else 0)
        self._models: dict[str, _Model] = {}  # what the disk tier keys each MLX model's files by
        self._live: dict[str, _Live] = {}  # each MLX model's running batch (L1)

    def attach(self, loaded: LoadedModel, backend: _Live) -> None:
        """A model just loaded on MLX (engine thread): its running batch (L1), and its disk-tier
        key, whose fingerprint reads its files (a few ms); its files for other weights are deleted."""
        self._live[loaded.model_id] = backend
        if not self.disk.enabled:
            return
        try:
            key = TierKey(loaded.model_id, weights_fingerprint(loaded.path), model_dtype(loaded.model), loaded.kv_bits)
            layout = [type(c).__name__ for c in make_prompt_cache(loaded.model)]
            if loaded.kv_bits:  # quantized_cache.py's QuantizedCache, written as mlx-lm's QuantizedKVCache
                layout = ["QuantizedKVCache"] * len(layout)
        except Exception:  # an unreadable file: this model keeps its prompt caches in RAM only
            log.exception("prompt cache: no disk tier for %s", loaded.model_id)
            return
        self._models[loaded.model_id] = _Model(key, layout)
        self.disk.drop_model(key)

    def attach_llamacpp(self, loaded: LoadedModel) -> None:
        """A GGUF just loaded on llama.cpp: its finished slots go to the disk tier and come back from
        it (backends/llamacpp_state.py), under a key of its file, "gguf" and its KV cache type."""
        if not self.disk.enabled:
            return
        from gerdsen_ai_server.engine.backends.llamacpp_state import SlotFiles

        backend = loaded.model
        try:
            key = TierKey(loaded.model_id, weights_fingerprint(loaded.path), "gguf", loaded.kv_bits)
        except OSError:
            log.exception("prompt cache: no disk tier for %s", loaded.model_id)
            return
        self.disk.drop_model(key)
        backend.slot_files = SlotFiles(backend._lc, backend._ctx, backend._mem, self.disk, key)  # noqa: SLF001

    def tiers(self) -> dict[str, TierStats]:
        """Each tier's counters: live (L1: bytes of the running batches' KV), ram (L2), disk (L3)."""
        live = 0
        for backend in list(self._live.values()):
            with contextlib.suppress(Exception):  # read from another thread while its batch changes
                live += backend.kv_bytes
        disk = self.disk
        return {
            "live": TierStats(bytes=live),
            "ram": TierStats(self.ram.hits, self.ram.misses, self.nbytes, self.ram.limit_bytes, len(self.lru)),
            "disk": TierStats(
                disk.hits, disk.misses, disk.nbytes, disk.max_bytes, len(disk), disk.writes, disk.rejected, disk.skipped
            ),
        }

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
        if cache is None:
            self.ram.misses += 1
        from_disk = self._from_disk(model_id, prompt, 0 if cache is None else len(prompt) - len(rest))
        if from_disk is not None:
            cache, rest = from_disk
        elif cache is not None:
            self.ram.hits += 1
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

    def _from_disk(self, model_id: str, prompt: list[int], cached: int) -> tuple[list[Any], list[int]] | None:
        """The disk tier's cache for ``prompt`` when it covers more than ``cached`` tokens (what L2
        has), read (kept in L2 from now on) and trimmed to the prompt's prefix; counted per tier."""
        known = self._models.get(model_id)
        if known is None:
            return None
        found = self.disk.best(known.key, prompt)
        read = None
        if found is not None and found[1] - cached >= DISK_MIN_GAIN:
            read = self.disk.read(known.key, found[0], known.layout)
        if read is None:
            if cached == 0:  # a miss in both tiers
                self.disk.misses += 1
            return None
        loaded, tokens = read
        if known.key.kv_bits:  # back to the class a quantized batch merges (quantized_cache.py: same state)
            from gerdsen_ai_server.engine.quantized_cache import QuantizedCache

            loaded = [QuantizedCache.from_state(c.state) for c in loaded]  # type: ignore[no-untyped-call]
        self.disk.hits += 1
        usable = found[1] if found is not None else 0
        cache = copy.deepcopy(loaded)
        if usable < len(tokens):
            trim_prompt_cache(cache, len(tokens) - usable)
        self.lru.insert_cache(model_id, tokens, loaded)
        return cache, prompt[usable:]

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
            known = self._models.get(model_id)
            if known is not None:  # written through to the disk tier, by its writer thread
                try:
                    self.disk.put(known.key, list(tokens), [_portable(c) for c in cache])
                except Exception:  # a cache state it cannot write: that one stays in RAM only
                    log.exception("prompt cache: not written to disk")
                    self.disk.skipped += 1
        del self._unstored[: len(stored)]  # only now: until stored, they count as pending

    def forget(self, model_id: str) -> None:
        """An unloaded model's prompt caches go with it (registry.unload, on the engine thread)."""
        self._unstored = [item for item in self._unstored if item[0] != model_id]
        self.lru.drop_model(model_id)
        self._models.pop(model_id, None)  # its files stay on disk for its next load (same key)
        self._live.pop(model_id, None)
