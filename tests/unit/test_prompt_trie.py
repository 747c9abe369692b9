"""The prompt cache's trie search (engine/mlxlm.py) finds what mlx-lm's finds, without walking the cache.

Checked against mlx-lm's own PromptTrie on random tries of token sequences that share their first
tokens (as chat prompts do), with entries removed as the LRU does. The cost is measured, not timed
here: `python -m bench.prompt_cache`.
"""

from __future__ import annotations

import random

import pytest
from mlx_lm.models.cache import PromptTrie

from gerdsen_ai_server.engine.mlxlm import _PromptTrie


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
    queries = [e[: rng.randrange(0, len(e) + 1)] + [rng.randrange(8) for _ in range(rng.randrange(0, 4))]
               for e in entries] + entries
    for query in queries:
        expected, got = theirs.search("m", query), ours.search("m", query)
        assert (got.exact, got.shorter, got.common_prefix) == (expected.exact, expected.shorter,
                                                               expected.common_prefix), query
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
