"""The prompt cache's disk tier (engine/prompt_cache_disk.py): files found again after a restart,
LRU by bytes, never read for another key, and refused and deleted when corrupt or truncated."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, load_prompt_cache

from gerdsen_ai_server.engine.prompt_cache_disk import DiskTier
from gerdsen_ai_server.engine.prompt_cache_format import TierKey, weights_fingerprint

LAYERS = 2
LAYOUT = ["KVCache"] * LAYERS
KEY = TierKey("tiny", "w1", "float32", 0)


def kv(tokens: list[int], seed: int = 0) -> list[KVCache]:
    """A two-layer KV cache holding ``tokens`` (random values: only the round trip matters)."""
    mx.random.seed(seed)
    cache = []
    for _ in range(LAYERS):
        c = KVCache()
        c.keys = mx.random.normal((1, 2, len(tokens), 8))
        c.values = mx.random.normal((1, 2, len(tokens), 8))
        c.offset = len(tokens)
        cache.append(c)
    mx.eval([c.state for c in cache])
    return cache


def written(tier: DiskTier, tokens: list[int], key: TierKey = KEY, seed: int = 0) -> list[KVCache]:
    cache = kv(tokens, seed)
    tier.put(key, tokens, cache)
    assert tier.flush(30)
    return cache


def files(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def test_an_entry_is_found_again_after_a_restart_and_reads_back_equal(tmp_path: Path) -> None:
    tokens = list(range(1, 21))
    cache = written(DiskTier(tmp_path, 1 << 30), tokens)
    (path,) = files(tmp_path)
    assert load_prompt_cache(str(path))[0].offset == 20  # mlx-lm's own format: its loader reads it

    again = DiskTier(tmp_path, 1 << 30)  # a new process on the same folder
    assert len(again) == 1 and again.nbytes == path.stat().st_size
    name, usable = again.best(KEY, tokens + [99, 98]) or ("", 0)
    assert usable == 20
    read = again.read(KEY, name, LAYOUT)
    assert read is not None and read[1] == tokens
    for got, want in zip(read[0], cache, strict=True):
        assert mx.array_equal(got.keys, want.keys) and mx.array_equal(got.values, want.values)
    # A longer cached prompt serves a shorter one (trimmed by the caller), all but its last token
    # (mlx-lm's fetch_nearest_cache: one token left to feed).
    assert again.best(KEY, tokens[:10]) == (name, 9)
    assert again.best(KEY, [7, 1, 2]) is None


@pytest.mark.parametrize(
    "other",
    [
        TierKey("other-model", "w1", "float32", 0),
        TierKey("tiny", "w2", "float32", 0),  # the model's files changed
        TierKey("tiny", "w1", "bfloat16", 0),
        TierKey("tiny", "w1", "float32", 8),
    ],
    ids=["model", "weights", "dtype", "kv_bits"],
)
def test_an_entry_is_never_found_for_another_key(tmp_path: Path, other: TierKey) -> None:
    tokens = list(range(1, 11))
    tier = DiskTier(tmp_path, 1 << 30)
    written(tier, tokens)
    assert tier.best(KEY, tokens) is not None
    assert tier.best(other, tokens) is None
    name = files(tmp_path)[0].name
    assert tier.read(other, name, LAYOUT) is None  # even asked by name, its header says no


def test_a_model_loaded_with_changed_files_drops_its_old_entries(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before  # stable
    (model / "model.safetensors").write_bytes(b"\1" * 4096)
    changed = weights_fingerprint(model)
    assert changed != before

    tier = DiskTier(tmp_path / "cache", 1 << 30)
    written(tier, [1, 2, 3], TierKey("m", before, "float32", 0))
    written(tier, [1, 2, 3], TierKey("n", before, "float32", 0))  # another model: kept
    tier.drop_model(TierKey("m", changed, "float32", 0))
    assert len(tier) == 1 and tier.best(TierKey("n", before, "float32", 0), [1, 2, 3]) is not None


def test_lru_by_bytes(tmp_path: Path) -> None:
    one = DiskTier(tmp_path, 1 << 30)
    written(one, list(range(100, 130)))
    size = files(tmp_path)[0].stat().st_size
    for path in files(tmp_path):
        path.unlink()

    tier = DiskTier(tmp_path, 2 * size + size // 2)  # room for two
    a, b, c = list(range(100, 130)), list(range(200, 230)), list(range(300, 330))
    written(tier, a)
    written(tier, b)
    name_a, _ = tier.best(KEY, a) or ("", 0)
    assert tier.read(KEY, name_a, LAYOUT) is not None  # a is now the most recently used
    written(tier, c)
    assert tier.nbytes <= tier.max_bytes and len(files(tmp_path)) == 2
    assert tier.best(KEY, b) is None and tier.best(KEY, a) is not None and tier.best(KEY, c) is not None
    # The order survives a restart (file mtimes), and a smaller bound evicts the oldest use first.
    os.utime(tmp_path / name_a, (1e9, 1e9))
    smaller = DiskTier(tmp_path, size + size // 2)
    assert len(smaller) == 1 and smaller.best(KEY, c) is not None


def test_a_longer_entry_replaces_its_prefix(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    written(tier, list(range(1, 11)))
    written(tier, list(range(1, 21)))
    assert len(files(tmp_path)) == 1
    assert tier.best(KEY, list(range(1, 11)) + [99])[1] == 10  # type: ignore[index]


def test_corrupt_or_truncated_files_are_refused_and_removed(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    written(tier, [1, 2, 3, 4])
    written(tier, [5, 6, 7, 8])
    written(tier, [9, 10, 11, 12])
    first, second, third = files(tmp_path)
    with first.open("r+b") as f:  # truncated (a crash while copying, a full disk)
        f.truncate(first.stat().st_size - 100)
    second.write_bytes(b"\xff" * 64)  # not safetensors at all
    (tmp_path / "garbage.safetensors").write_bytes(b"")
    (tmp_path / ".tmp-half.safetensors").write_bytes(b"x")  # a write a crash cut short

    again = DiskTier(tmp_path, 1 << 30)
    assert len(again) == 1 and again.rejected == 3
    assert [p.name for p in tmp_path.iterdir()] == [third.name]

    # Truncated after the scan: refused when read, and deleted.
    with third.open("r+b") as f:
        f.truncate(third.stat().st_size - 8)
    assert again.read(KEY, third.name, LAYOUT) is None
    assert not third.exists() and len(again) == 0 and again.nbytes == 0


def test_a_cache_whose_arrays_do_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    written(tier, [1, 2, 3])
    name = files(tmp_path)[0].name
    assert tier.read(KEY, name, ["KVCache"] * 3) is None  # a model with three layers
    assert not (tmp_path / name).exists()


def test_caches_mlx_lm_cannot_load_back_are_not_written(tmp_path: Path) -> None:
    class OwnCache(KVCache):  # a subclass from elsewhere (the batched quantized cache's)
        pass

    tier = DiskTier(tmp_path, 1 << 30)
    cache = kv([1, 2, 3])
    own = [OwnCache.from_state(c.state) for c in cache]
    tier.put(KEY, [1, 2, 3], own)
    tier.put(KEY, [1, 2, 3, 4], cache)  # holds 3 tokens, not 4
    assert tier.flush(5) and tier.skipped == 2 and not files(tmp_path)


def test_off_writes_nothing(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "cache", 0)
    tier.put(KEY, [1, 2, 3], kv([1, 2, 3]))
    assert not (tmp_path / "cache").exists() and tier.best(KEY, [1, 2, 3]) is None


def test_llamacpp_state_files_round_trip_and_a_truncated_one_is_refused(tmp_path: Path) -> None:
    """The llama.cpp slot files (backends/llamacpp_state.py): one byte tensor under the same header."""
    from gerdsen_ai_server.engine.backends.llamacpp_state import read_state, write_state
    from gerdsen_ai_server.engine.prompt_cache_format import metadata

    key = TierKey("gguf-model", "w1", "gguf", 8)
    tier = DiskTier(tmp_path, 1 << 30)
    blob = bytes(range(256)) * 40
    for tokens in ([1, 2, 3], [7, 8, 9]):
        header = metadata(key, tokens, "gguf")
        tier.submit(key, tokens, len(blob), lambda path, h=header: write_state(path, blob, h), True)
    assert tier.flush(30) and tier.writes == 2
    name, usable = tier.best(key, [1, 2, 3, 4]) or ("", 0)
    assert usable == 3 and tier.open(key, name, lambda path, meta, tokens: read_state(path)) == (blob, [1, 2, 3])
    assert tier.best(TierKey("gguf-model", "w1", "gguf", 4), [1, 2, 3, 4]) is None  # another cache type
    other = next(p for p in files(tmp_path) if p.name != name)
    with other.open("r+b") as f:
        f.truncate(other.stat().st_size - 1)
    assert tier.open(key, other.name, lambda path, meta, tokens: read_state(path)) is None and not other.exists()
