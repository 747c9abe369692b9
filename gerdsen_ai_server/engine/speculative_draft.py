"""Speculative decoding's drafts (prompt lookup, a draft model) and the rule that accepts them.

Prompt lookup is ``NgramIndex``, a draft model ``ModelDrafter``; ``accept_sampled`` is the rejection
rule that keeps the target distribution, ``accept_greedy`` its temperature-0 case.

Acceptance is the standard rule (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"). Both drafts are deterministic (q = 1 on the drafted token: prompt lookup,
and the draft model's greedy steps), so the rule reduces to: accept a drafted token d with
probability p(d) under the target distribution (the request's temperature, top-p, min-p and top-k
applied exactly as its sampler applies them); on the first rejection sample the replacement from p
with d removed and renormalised; when every draft is accepted, one more token comes from the
request's own sampler. Greedy is the p = one-hot case: accept while the draft equals the argmax.
speculative.py runs them inside the engine's decode batch.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import Sampler

from gerdsen_ai_server.engine.protocol import GenerationRequest
from gerdsen_ai_server.engine.sampling import _filters


class NgramIndex:
    """Prompt lookup's drafts for one sequence: where each of its n-grams last ended, kept up to date a
    token at a time, so a lookup is a few dictionary reads however long the context (on a GPU a decode
    step is about a millisecond: a scan of a few thousand tokens a step would cost as much).

    ``draft`` proposes up to ``count`` tokens that followed the most recent earlier occurrence of the
    context's last n tokens, for n from ``lookup_max`` down to ``lookup_min`` (the longest match
    first, as vLLM's ngram proposer); [] when none occurs. The most recent occurrence: in an edit of
    a text, the copy under way is the likeliest continuation."""

    def __init__(self, lookup_min: int, lookup_max: int) -> None:
        self.tokens: list[int] = []
        self.sizes = range(lookup_min, lookup_max + 1)
        self._last_end: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        context, last_end = self.tokens, self._last_end
        for token in tokens:
            end = len(context) - 1  # the n-grams ending here now have a continuation: index them
            for n in self.sizes:
                if end + 1 >= n:
                    last_end[tuple(context[end - n + 1 : end + 1])] = end
            context.append(token)

    def draft(self, count: int) -> list[int]:
        size = len(self.tokens)
        for n in reversed(self.sizes):
            end = self._last_end.get(tuple(self.tokens[size - n :])) if n < size else None
            if end is not None:
                return self.tokens[end + 1 : end + 1 + count]
        return []


class ModelDrafter:
    """Draft-model drafts for one sequence (the draft side of mlx-lm's ``speculative_generate_step``,
    kept per sequence): the draft model's own KV cache is caught up with the tokens the sequence
    gained since its last draft (accepted, or decoded one a step in a batch meanwhile), then ``count``
    greedy draft steps. A greedy draft is a deterministic proposal, so prompt lookup's acceptance rule
    keeps the target distribution here too."""

    PREFILL_CHUNK = 512

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = make_prompt_cache(model)
        self.held = 0  # the sequence's tokens its KV cache holds

    def draft(self, new: list[int], count: int) -> list[int]:
        """``new``: the sequence's tokens past ``held``, the pending one last."""
        if not can_trim_prompt_cache(self.cache):
            return []
        x = mx.array(new)[None]
        while x.shape[1] > self.PREFILL_CHUNK:
            self.model(x[:, : self.PREFILL_CHUNK], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            x = x[:, self.PREFILL_CHUNK :]
        logits = self.model(x, cache=self.cache)[:, -1, :]
        drafted: list[mx.array] = []
        for i in range(count):
            drafted.append(mx.argmax(logits, axis=-1))
            if i + 1 < count:
                logits = self.model(drafted[-1][None], cache=self.cache)[:, -1, :]
        mx.eval(drafted)
        self.held += len(new) + count - 1
        return [cast(int, t.item()) for t in drafted]

    def settle(self, confirmed: int) -> None:
        """Keep in its KV cache only the sequence's first ``confirmed`` tokens (the rest was rejected)."""
        if self.held > confirmed:
            trim_prompt_cache(self.cache, self.held - confirmed)
            self.held = confirmed


def target_probs(request: GenerationRequest, logprobs: mx.array) -> mx.array:
    """The distribution the request's sampler draws from, per row: its filters, then its temperature
    (sampling.build_sampler and mlx-lm's make_sampler apply the same filters in the same order)."""
    for keep in _filters(request.sampling):
        logprobs = keep(logprobs)
    return mx.softmax(logprobs * (1.0 / request.sampling.temperature), axis=-1)


def accept_sampled(
    request: GenerationRequest, logprobs: mx.array, draft: list[int], sampler: Sampler
) -> tuple[int, int]:
    """(how many drafted tokens are accepted, the token after them) by the rejection rule above.

    ``logprobs`` has one row per drafted token plus one: row i is the distribution of draft[i]'s position."""
    k = len(draft)
    if k == 0:  # a row of the batch with nothing drafted this step: its sampler's plain step
        return 0, cast(int, sampler(logprobs[:1]).item())
    probs = target_probs(request, logprobs[:k])
    drafted = mx.array(draft)
    p_draft = mx.take_along_axis(probs, drafted[:, None], axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(k,)) < p_draft
    # The replacement at each position: p with the drafted token removed, renormalised (categorical
    # normalises; a zero probability is log 0 = -inf, never drawn).
    removed = mx.arange(probs.shape[-1])[None, :] == drafted[:, None]
    replacement = mx.random.categorical(mx.log(mx.where(removed, 0.0, probs)))
    bonus = sampler(logprobs[k:])
    mx.eval(accept, replacement, bonus)
    accepted = cast(list[bool], accept.tolist())
    n = accepted.index(False) if False in accepted else k
    following = cast(list[int], replacement.tolist())[n] if n < k else cast(int, bonus.item())
    return n, following


def accept_greedy(targets: list[int], draft: list[int]) -> tuple[int, int]:
    """(accepted drafts, the token after them) at temperature 0: a draft is accepted while it is the
    argmax (``targets``: the argmax at each of the draft's positions and one more)."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return n, targets[n]
