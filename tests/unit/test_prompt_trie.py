"""The prompt cache's trie search (engine/mlxlm.py) finds what mlx-lm's finds, without walking the cache;
dropping a model's entries keeps the other models' and the byte count right.

Checked against mlx-lm's own PromptTrie on random tries of token sequences that share their first
tokens (as chat prompts do), with entries removed as the LRU does. The cost is measured, not timed
here: `python -m bench.prompt_cache`.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, PromptTrie

from gerdsen_ai_server.engine.mlxlm import PromptCache, _PromptTrie


def stored(trie: PromptTrie, tokens: list[int]) -> bool:
    try:
        trie.get("m", tokens)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("seed", range(20))
def test_search_agrees_with_mlx_lm(seed: int) -> None:
    rng = random.Random(seed)
    theirs, ours = PromptTrie(), _PromptTrie()
    entries: list[list[int]] = []
    for _ in range(rng.randrange(1, 40)):
        head = [1, 2, 3][: rng.randrange(0, 4)]  # a shared template, or not
        tokens = head + [rng.randrange(8) for _ in range(rng.randrange(1, 12))]
        entries.append(tokens)
        for trie in (theirs, ours):
            trie.add("m", tokens, object())
    for tokens in rng.sample(entries, len(entries) // 3):  # evicted, as LRUPromptCache pops them
        if stored(theirs, tokens):
            theirs.pop("m", tokens)
            ours.pop("m", tokens)
    queries = [
        e[: rng.randrange(0, len(e) + 1)] + [rng.randrange(8) for _ in range(rng.randrange(0, 4))] for e in entries
    ] + entries
    for query in queries:
        expected, got = theirs.search("m", query), ours.search("m", query)
        assert (got.exact, got.shorter, got.common_prefix) == (
            expected.exact,
            expected.shorter,
            expected.common_prefix,
        ), query
        assert (got.longer is None) == (expected.longer is None), query
        if got.longer is not None:  # maybe another of the sequences extending the common prefix
            assert got.longer[: got.common_prefix] == query[: got.common_prefix]
            assert stored(ours, got.longer), (query, got.longer)


def test_a_model_without_entries_finds_nothing() -> None:
    trie = _PromptTrie()
    assert trie.search("m", [1, 2]).longer is None
    trie.add("m", [1, 2], object())
    trie.pop("m", [1, 2])
    result = trie.search("m", [1, 2, 3])
    assert (result.exact, result.shorter, result.longer, result.common_prefix) == (None, None, None, 0)


def kv(length: int) -> list[KVCache]:
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 2, length, 4)), mx.zeros((1, 2, length, 4)))
    return [cache]


def test_dropping_a_model_keeps_the_others_entries_and_the_byte_count() -> None:
    cache = PromptCache(max_size=100, max_bytes=1 << 30)
    for model, tokens in [("a", [1, 2, 3]), ("b", [1, 2, 3]), ("a", [4, 5]), ("b", [1, 9]), ("a", [1, 2, 7, 8])]:
        cache.insert_cache(model, tokens, kv(len(tokens)))
    b_bytes = sum(c.nbytes for tokens in ([1, 2, 3], [1, 9]) for c in kv(len(tokens)))

    cache.drop_model("a")
    assert (len(cache), cache.nbytes) == (2, b_bytes)
    assert cache.fetch_nearest_cache("a", [1, 2, 3, 4]) == (None, [1, 2, 3, 4])
    found, rest = cache.fetch_nearest_cache("b", [1, 2, 3, 4])
    assert found is not None and rest == [4]

    cache.insert_cache("a", [4, 5], kv(2))  # the model comes back: cached and evicted as before
    assert len(cache) == 3
    cache.trim_to(n_sequences=0)
    assert (len(cache), cache.nbytes) == (0, 0)
