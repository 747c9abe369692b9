"""The prompt cache's disk tier (L3): finished prefixes' KV caches as mlx-lm prompt-cache files that survive a restart.

Files live in ``<models_dir>/.prompt-cache/``, one per cached token prefix, in mlx-lm's own format
(``save_prompt_cache`` / ``load_prompt_cache``: safetensors, the cache classes and scalars in the
header), bounded by IMPETUS_PROMPT_CACHE_DISK_BYTES (least recently used file out first; use is
the file's mtime, so the order survives a restart). Each file is bound to a ``TierKey``: the model
id, a fingerprint of its weight files, the compute dtype and the KV bits; the header holds the key
and the token list itself, and a file is read only for the same key and a prompt those tokens
start (its tokens are compared, not only their hash). A file whose header, size or arrays do not
check out is deleted, never used.

Writes are write-through, off the engine thread: the engine hands each finished sequence's cache,
already evaluated, to ``put``, and one writer thread saves it (to a temporary name, then renamed:
a crash leaves no half file under a real name). Write-through rather than write-on-eviction, like
vLLM's LMCache disk offload (every stored prefix is also written): the RAM tier's newest entries
(an agent's shared system prompt) are the ones a restart needs, and they are never evicted before
the process ends; llama-server saves a slot only when asked (``/slots?action=save``). A file for
a prefix of a newer one is deleted (the newer one trims to it), as mlx-lm's LRU drops prefixes.
llama.cpp's slots use the same index and writer (``submit`` a writing function, ``open`` a file
with a reading one: backends/llamacpp_state.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from gerdsen_ai_server.engine.mlxlm import _PromptTrie
from gerdsen_ai_server.engine.prompt_cache_format import (
    SUFFIX,
    TierKey,
    check_layers,
    flatten,
    metadata,
    read_header,
    savable,
    tokens_hash,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


# Fewest prompt tokens a disk file must cover beyond what RAM has for it to be read: a file is read
# whole whatever the match (131 MB, ~0.14 s, for the bench model's 4,000 tokens), and prompts that
# share only a chat template's first tokens matched whole files for a handful of tokens (the agent
# bench counted 4 such reads after a restart). 128 tokens of prefill cost more than such a read.
DISK_MIN_GAIN = 128


@dataclass
class _Entry:
    name: str
    key: str  # TierKey.digest
    model_id: str
    tokens: list[int]
    nbytes: int


class DiskTier:
    """The disk tier's files, index and writer thread (``put`` and ``read`` run on the engine thread)."""

    def __init__(self, root: Path, max_bytes: int, queue_bytes: int = 256 << 20) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        self.hits = self.misses = self.writes = self.rejected = self.skipped = 0
        self._queue_limit = queue_bytes  # caches waiting for the writer hold memory: beyond this, not written
        self._queued = 0
        self._pending = 0  # caches queued or being written (flush waits for none)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._trie = _PromptTrie()  # type: ignore[no-untyped-call]  # mlx-lm's PromptTrie.__init__ is unannotated
        self._bytes = 0
        self._jobs: queue.Queue[tuple[_Entry, Callable[[str], None], int, bool]] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        if self.enabled:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the files hold prompts' tokens
            self._scan()
            threading.Thread(target=self._write_forever, name="impetus-prompt-cache-writer", daemon=True).start()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # ---- index (any thread, under the lock) ---------------------------------------------
    def _scan(self) -> None:
        """Index the files a previous run left, oldest use first; drop what does not check out."""
        found: list[tuple[float, _Entry]] = []
        for path in self.root.iterdir():
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # a write cut short by a crash
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                meta = read_header(path)
                entry = _Entry(
                    path.name, meta["key"], meta["model_id"], json.loads(meta["tokens"]), path.stat().st_size
                )
                if tokens_hash(entry.tokens) != meta["tokens_sha256"]:
                    raise ValueError("tokens do not match their hash")
            except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
                log.warning("prompt cache: removing %s (%s)", path.name, exc)
                self.rejected += 1
                path.unlink(missing_ok=True)
                continue
            found.append((path.stat().st_mtime, entry))
        with self._lock:
            for _, entry in sorted(found, key=lambda item: item[0]):
                self._add(entry)
            self._evict()

    def _add(self, entry: _Entry) -> None:
        old = self._entries.pop(entry.name, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[entry.name] = entry
        self._trie.add(entry.key, entry.tokens, entry.name)
        self._bytes += entry.nbytes

    def _remove(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        self._bytes -= entry.nbytes
        try:
            self._trie.pop(entry.key, entry.tokens)
        except KeyError:
            pass
        (self.root / name).unlink(missing_ok=True)

    def _prefixes(self, key: str, tokens: list[int]) -> list[str]:
        """The files of ``key`` whose tokens are a proper prefix of ``tokens``."""
        node = self._trie._trie.get(key, {})  # noqa: SLF001
        names = []
        for token in tokens:
            if "__value__" in node:
                names.append(node["__value__"])
            if token not in node:
                break
            node = node[token]
        return names

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))

    def best(self, key: TierKey, tokens: list[int]) -> tuple[str, int] | None:
        """The file whose cache covers the longest prefix of ``tokens``, and that prefix's length
        (as mlx-lm's LRUPromptCache.fetch_nearest_cache picks: exact, a longer one trimmed, a shorter one)."""
        if not self.enabled:
            return None
        with self._lock:
            found = self._trie.search(key.digest, tokens)
            if found.exact is not None:
                return self._trie.get(key.digest, found.exact), len(tokens)
            short = len(found.shorter) if found.shorter is not None else 0
            if found.longer is not None and found.common_prefix > short:
                return self._trie.get(key.digest, found.longer), min(len(tokens) - 1, found.common_prefix)
            if found.shorter is not None and short:
                return self._trie.get(key.digest, found.shorter), short
        return None

    def drop_model(self, key: TierKey) -> None:
        """Delete the files of ``key.model_id`` made for other weights, dtype or KV bits: a model
        loaded again under its id with changed files must never start from them."""
        with self._lock:
            for entry in [e for e in self._entries.values() if e.model_id == key.model_id and e.key != key.digest]:
                self._remove(entry.name)

    # ---- engine thread --------------------------------------------------------------------
    def read(self, key: TierKey, name: str, layout: list[str]) -> tuple[list[Any], list[int]] | None:
        """The cache in file ``name`` and its tokens, checked against ``key`` and the model's cache
        ``layout`` (its classes, one per layer); None, and the file deleted, when anything is off.
        Runs on the engine thread (MLX reads the arrays): ~0.1 s for 200 MB from the page cache."""

        def load(path: Path, meta: dict[str, str], tokens: list[int]) -> list[Any]:
            cache = mlx_cache.load_prompt_cache(str(path))
            mx.eval([c.state for c in cache])
            check_layers(cache, layout, len(tokens), meta.get("kv_dtype", ""))
            return cache  # type: ignore[no-any-return]

        return self.open(key, name, load)

    def open(
        self, key: TierKey, name: str, load: Callable[[Path, dict[str, str], list[int]], T]
    ) -> tuple[T, list[int]] | None:
        """File ``name``'s contents as ``load`` makes them (given its path, header and tokens), once its
        header has matched ``key`` and its tokens; None, and the file deleted, when anything is off."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            return None
        started = time.monotonic()
        try:
            meta = read_header(self.root / name)
            expected = {"key": key.digest, "model_id": key.model_id, "weights": key.weights, "dtype": key.dtype}
            if any(meta.get(k) != v for k, v in expected.items()) or meta.get("kv_bits") != str(key.kv_bits):
                raise ValueError("made for another model, weights, dtype or KV bits")
            tokens = json.loads(meta["tokens"])
            if tokens != entry.tokens or tokens_hash(tokens) != meta["tokens_sha256"]:
                raise ValueError("tokens do not match")
            loaded = load(self.root / name, meta, tokens)
        except Exception as exc:  # noqa: BLE001 - a bad file is refused, whatever is wrong with it
            log.warning("prompt cache: refusing %s (%s)", name, exc)
            self.rejected += 1
            with self._lock:
                self._remove(name)
            return None
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
        with contextlib.suppress(OSError):  # evicted meanwhile by the writer thread
            os.utime(self.root / name)  # its use, for the LRU order after a restart
        log.debug("prompt cache: read %s (%d tokens) in %.0f ms", name, len(tokens), 1e3 * (time.monotonic() - started))
        return loaded, tokens

    def reject(self, name: str) -> None:
        """A file its reader could not use after all (llama.cpp refused its state): deleted."""
        self.rejected += 1
        with self._lock:
            self._remove(name)

    def put(self, key: TierKey, tokens: list[int], cache: list[Any]) -> None:
        """Queue ``cache`` (evaluated: the writer thread runs no MLX computation) for writing. Not
        written: a cache mlx-lm cannot read back, one whose layers do not hold exactly ``tokens``,
        one larger than the tier, or one that would take the queue past its bound (the disk is behind)."""
        if not self.enabled or not tokens:
            return
        offsets = {getattr(c, "offset", len(tokens)) for c in cache}
        nbytes = sum(c.nbytes for c in cache)
        if not savable(cache) or offsets != {len(tokens)}:
            self.skipped += 1
            return
        if self.full(nbytes):
            return
        tokens = [int(t) for t in tokens]
        if self.known(key, tokens):
            return
        first = next((c.keys for c in cache if isinstance(getattr(c, "keys", None), mx.array)), None)
        arrays, header = flatten(cache, metadata(key, tokens, str(first.dtype) if first is not None else ""))
        mx.eval(list(arrays.values()))
        self.submit(
            key,
            tokens,
            nbytes,
            lambda path: mx.save_safetensors(path, arrays, header),
            mlx_cache.can_trim_prompt_cache(cache),
        )

    def known(self, key: TierKey, tokens: list[int]) -> bool:
        """Whether a file holds exactly ``tokens`` for ``key`` (then only its use is new)."""
        name = f"{key.digest[:16]}-{tokens_hash(tokens)}{SUFFIX}"
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return True
        return False

    def full(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would take the writer's queue past its bound (one at a time always
        fits), or is more than the whole tier: then that cache is not written (``skipped``)."""
        if (self._queued > 0 and self._queued + nbytes > self._queue_limit) or nbytes > self.max_bytes:
            self.skipped += 1
            return True
        return False

    def submit(
        self, key: TierKey, tokens: list[int], nbytes: int, write: Callable[[str], None], trimmable: bool
    ) -> None:
        """Queue ``write`` (it writes the file at the path it is given: no MLX computation) for the writer thread."""
        with self._lock:
            self._queued += nbytes
            self._pending += 1
            self._idle.clear()
        entry = _Entry(f"{key.digest[:16]}-{tokens_hash(tokens)}{SUFFIX}", key.digest, key.model_id, tokens, nbytes)
        self._jobs.put((entry, write, nbytes, trimmable))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued cache is written (tests, shutdown)."""
        return self._idle.wait(timeout)

    # ---- writer thread ---------------------------------------------------------------------
    def _write_forever(self) -> None:
        # Never returns: a thread that touched MLX must not exit before the process (engine.py).
        while True:
            entry, write, queued, trimmable = self._jobs.get()
            try:
                self._write(entry, write, trimmable)
            except Exception:  # a full disk, a removed folder: that cache is not kept
                log.exception("prompt cache: writing %s failed", entry.name)
            finally:
                del write  # the arrays it holds
                with self._lock:
                    self._queued -= queued
                    self._pending -= 1
                    if not self._pending:
                        self._idle.set()

    def _write(self, entry: _Entry, write: Callable[[str], None], trimmable: bool) -> None:
        started = time.monotonic()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.root / f".tmp-{entry.name}"
        write(str(temporary))
        os.replace(temporary, self.root / entry.name)
        entry.nbytes = (self.root / entry.name).stat().st_size
        with self._lock:
            if trimmable:  # files for a prefix of this one go: it trims to them (as mlx-lm's LRU does)
                for name in self._prefixes(entry.key, entry.tokens):
                    self._remove(name)
            self._add(entry)
            self._evict()
        self.writes += 1
        log.debug(
            "prompt cache: wrote %s (%d bytes) in %.0f ms", entry.name, entry.nbytes, 1e3 * (time.monotonic() - started)
        )
