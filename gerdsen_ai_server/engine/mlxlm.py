"""Two of mlx-lm's classes, each with one method changed where the engine measured a cost, and a
method the prompt cache lacks (forgetting a model's entries).

Everything else (sampling, logits processors, KV caches, the LRU and its byte budget) is mlx-lm's.
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import LRUPromptCache, PromptTrie, PromptTrieResult


class DecodeBatch(GenerationBatch):
    """mlx-lm's decode batch, without the forward pass that no token will come from.

    Each step of mlx-lm's GenerationBatch starts the forward pass on the tokens it is about to
    return (so the next step's tokens compute while these go out), also at the step where every
    sequence reaches its ``max_tokens``. That pass only writes the last token's KV; on 2 CPU cores
    it took ~30-40 ms, and the next prompts' prefill and the store of the finished caches waited
    for it. When every sequence in the batch ends by length at this step, this step skips it. The
    tokens a sequence reports (``all_tokens``) stay those its KV cache holds, as mlx-lm keeps them:
    the prompt cache stores the answer but its last token.
    """

    forwarded = True  # whether the last step started a forward pass (a full decode step's time)

    def _step(self) -> tuple[list[int], list[mx.array]]:
        self.forwarded = not self.uids or any(n + 1 < m for n, m in zip(self._num_tokens, self.max_tokens, strict=True))
        if self.forwarded:
            return super()._step()
        tokens, logprobs = self._next_tokens, self._next_logprobs
        # mlx-lm declares _current_tokens by its first value, None; it holds the step's token array
        self._current_tokens = tokens  # type: ignore[assignment]
        self._current_logprobs = logprobs
        mx.eval(tokens, logprobs)
        return cast(list[int], tokens.tolist()), logprobs


class _PromptTrie(PromptTrie):
    """mlx-lm's token trie of cached prompts, with a search that costs the prompt's length.

    mlx-lm's search looks for the shortest cached sequence extending the prompt's common prefix
    by walking every node below where the prompt leaves the trie. Prompts that share their first
    tokens (a chat template, a common instruction) leave it near the root, so each lookup walked
    the whole cache, in Python, on the engine thread, at every admission: with the bench model's
    100-token answers 0.65 ms at 16 entries, 5.5 ms at 160, 12 ms at 320 (1 GiB; the default
    256 MiB holds 80), against 0.10-0.15 ms here (``python -m bench.prompt_cache``).
    Here the walk below that point follows one branch to the nearest cached sequence on it: the
    result is the same but for which of the longer sequences is trimmed to the common prefix.
    """

    def search(self, model: Any, tokens: list[int]) -> PromptTrieResult:
        if model not in self._trie:
            return PromptTrieResult(model, None, None, None, 0)
        current = self._trie[model]
        if not tokens and "__value__" in current:
            return PromptTrieResult(model, [], None, None, 0)
        last_index, index = -1, 0
        while index < len(tokens) and tokens[index] in current:
            current = current[tokens[index]]
            if "__value__" in current:
                last_index = index
            index += 1
        if last_index == len(tokens) - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        shorter = tokens[: last_index + 1] if last_index > 0 else None
        longer = None
        if index > 0:
            extra: list[int] = []
            while current and "__value__" not in current:  # leaves hold values: pop prunes empty branches
                token = next(iter(current))
                extra.append(token)
                current = current[token]
            longer = tokens[:index] + extra if "__value__" in current else None
        return PromptTrieResult(model, None, shorter, longer, index)


class PromptCache(LRUPromptCache):
    """mlx-lm's LRU of KV caches by token prefix, searched by ``_PromptTrie``."""

    def __init__(self, max_size: int, max_bytes: int) -> None:
        super().__init__(max_size=max_size, max_bytes=max_bytes)
        self._trie = _PromptTrie()  # type: ignore[no-untyped-call]  # mlx-lm's PromptTrie.__init__ is unannotated

    def drop_model(self, model: Any) -> None:
        """Forget every cached prompt of ``model``, which has left memory: its KV caches free their
        memory with it, and a model loaded later under the same id (another folder of that name,
        new weights) must not start from them."""
        for cache_type, lru in self._lru._lrus.items():  # noqa: SLF001
            for key in [key for key in lru if key[0] == model]:
                entry = self._trie.pop(*key)
                self._n_bytes -= entry.nbytes
                self._n_bytes_by_type[cache_type] -= entry.nbytes
            self._lru._lrus[cache_type] = deque(key for key in lru if key[0] != model)  # noqa: SLF001
        self._trie._trie.pop(model, None)  # noqa: SLF001  (PromptTrie.pop prunes all but the model's root)
