"""Speculative decoding inside the continuous batch: prompt-lookup (n-gram) or draft-model drafts, verified in one pass.

Design (issue 28 item 4): a batch never leaves continuous batching because a request speculates.
``SpeculativeBatch`` is the engine's decode batch (mlxlm.py's ``DecodeBatch``); at a step where it
holds exactly one sequence and that sequence asked for speculation, it drafts up to
``num_speculative_tokens`` tokens, runs the model once over the pending token and the draft, keeps
the accepted prefix, and trims the rejected tail from the KV cache. Drafts come from prompt lookup
(vLLM's ``ngram`` method: the tokens after the most recent earlier occurrence of the context's last
``prompt_lookup_max``..``prompt_lookup_min`` tokens, ``NgramIndex``) or from a small draft model of
the same vocabulary (vLLM's ``draft_model``, ``ModelDrafter``: greedy draft steps on its own KV
cache). When another sequence joins, every sequence decodes one token a step as before, inside the
batch, and the joiner is prefilled in the same step (mlx_lm.server turns batching off for a draft
model instead). mlx-lm's ``BatchKVCache`` trims all rows by one shared length (``trim``), so
per-row acceptance in a batch of several would need a re-padding of the cache: not done here.

Acceptance is the standard rule (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"). Both drafts are deterministic (q = 1 on the drafted token: prompt lookup,
and the draft model's greedy steps), so the rule reduces to: accept a drafted token d with
probability p(d) under the target distribution (the request's temperature, top-p, min-p and top-k
applied exactly as its sampler applies them); on the first rejection sample the replacement from p
with d removed and renormalised; when every draft is accepted, one more token comes from the
request's own sampler. Greedy is the p = one-hot case: accept while the draft equals the argmax.
The output keeps the target distribution: greedy output is the plain decoding's, token for token
(tests/engine/test_speculative.py checks both).

Not speculated (decoded one token a step, as without it): a sequence with logits processors
(penalties, logit_bias, a grammar), a seeded sampled request (its tokens must not depend on what
else is in the batch), a KV cache that cannot be trimmed (``is_trimmable``: a rotating one, say).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import Sampler

from gerdsen_ai_server.engine.mlxlm import DecodeBatch
from gerdsen_ai_server.engine.protocol import GenerationRequest, SpeculativeParams
from gerdsen_ai_server.engine.sampling import _filters
from gerdsen_ai_server.engine.stats import EngineStats

RequestOf = Callable[[int], GenerationRequest | None]  # a sequence's request by its uid (None: gone)


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


def accept_greedy(logprobs: mx.array, draft: list[int]) -> tuple[int, int]:
    """(accepted drafts, the token after them) at temperature 0: a draft is accepted while it is the argmax."""
    targets = cast(list[int], mx.argmax(logprobs, axis=-1).tolist())
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return n, targets[n]


class SpeculativeBatch(DecodeBatch):
    """The engine's decode batch, speculating while it holds one sequence that asked for it."""

    request_of: RequestOf = staticmethod(lambda uid: None)
    stats_of: Callable[[], EngineStats | None] = staticmethod(lambda: None)
    _ngrams: tuple[int, NgramIndex] | None = None  # the speculating sequence's uid and its index
    _drafter: tuple[int, ModelDrafter] | None = None  # or its draft model's state

    @classmethod
    def create(
        cls, model: Any, sampler: Sampler, request_of: RequestOf, stats_of: Callable[[], EngineStats | None]
    ) -> SpeculativeBatch:
        """An empty batch (mlx-lm's ``empty``) that finds each sequence's request through ``request_of``."""
        batch = cast(SpeculativeBatch, cls.empty(model, sampler))
        batch.request_of, batch.stats_of = request_of, stats_of
        return batch

    def next(self) -> list[GenerationBatch.Response]:
        if self._drafter is not None and self._drafter[0] not in self.uids:
            self._drafter = None  # its sequence ended: free the draft KV cache (and the draft model with it)
        if self._ngrams is not None and self._ngrams[0] not in self.uids:
            self._ngrams = None
        if len(self.uids) == 1 and not (self.logits_processors and self.logits_processors[0]):
            request = self.request_of(self.uids[0])
            plan = request.speculative if request is not None else None
            if request is not None and plan is not None and self._may_speculate(request):
                responses = self._speculate(request, plan)
                if responses is not None:
                    return responses
        return super().next()

    def _may_speculate(self, request: GenerationRequest) -> bool:
        sampling = request.sampling
        if sampling.temperature > 0 and sampling.seed is not None:
            return False
        return all(c.is_trimmable() for c in self.prompt_cache)

    def _speculate(self, request: GenerationRequest, plan: SpeculativeParams) -> list[GenerationBatch.Response] | None:
        """One verification pass for the batch's one sequence; None when there is nothing to draft
        (the plain step runs instead). The pending token (sampled at the last step, not yet in the
        KV cache) and the draft go through the model together; the KV cache ends holding exactly
        the tokens returned, as after plain steps."""
        pending, pending_logprobs = self._next_tokens, self._next_logprobs[0]
        mx.eval(pending, pending_logprobs)
        first = cast(int, pending.item())
        room = self.max_tokens[0] - self._num_tokens[0] - 1  # drafts that could still be returned
        count = min(plan.num_tokens, room)
        if count <= 0:
            return None
        uid, known = self.uids[0], len(self.tokens[0])
        drafter = None
        if plan.draft is not None:
            if self._drafter is None or self._drafter[0] != uid or self._drafter[1].model is not plan.draft:
                self._drafter = (uid, ModelDrafter(plan.draft))
            drafter = self._drafter[1]
            draft = drafter.draft([*self.tokens[0][drafter.held :], first], count)
        else:
            if self._ngrams is None or self._ngrams[0] != uid:
                self._ngrams = (uid, NgramIndex(plan.lookup_min, plan.lookup_max))
            index = self._ngrams[1]
            index.extend([*self.tokens[0][len(index.tokens) :], first])  # the sequence's tokens since its last draft
            draft = index.draft(count)
        if not draft:
            return None
        logits = self.model(mx.array([[first, *draft]], dtype=pending.dtype), cache=self.prompt_cache)[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if request.sampling.temperature == 0:
            accepted, following = accept_greedy(logprobs, draft)
        else:
            sampler = self.samplers[0] if self.samplers else self.fallback_sampler
            accepted, following = accept_sampled(request, logprobs, draft, sampler)
        self.forwarded = True
        stats = self.stats_of()
        if stats is not None:
            stats.speculative_drafted_total += len(draft)
            stats.speculative_accepted_total += accepted
        responses = self._respond(
            [first, *draft[:accepted]],
            [pending_logprobs, *logprobs[:accepted]],
            len(draft) + 1,
            following,
            logprobs[accepted],
        )
        if drafter is not None:
            drafter.settle(known + len(responses))
        return responses

    def _respond(
        self, tokens: list[int], logprobs: list[mx.array], fed: int, following: int, following_logprobs: mx.array
    ) -> list[GenerationBatch.Response]:
        """The responses of the run ``tokens`` (``fed`` tokens went into the KV cache), ending at the
        first end token or the max_tokens budget exactly as plain steps would; the rest is trimmed."""
        finish: str | None = None
        returned = 0
        for token in tokens:
            returned += 1
            self._num_tokens[0] += 1
            if self._num_tokens[0] >= self.max_tokens[0]:
                finish = "length"
            if self._matchers[0].advance(token):
                finish = "stop"
            if finish is not None:
                break
        for cache in self.prompt_cache:
            cache.trim(fed - returned)
        self.tokens[0].extend(tokens[:returned])
        uid = self.uids[0]
        responses = [
            GenerationBatch.Response(uid, token, logprob, None, None, None)
            for token, logprob in zip(tokens[: returned - 1], logprobs, strict=False)
        ]
        last = GenerationBatch.Response(uid, tokens[returned - 1], logprobs[returned - 1], finish, None, None)
        if finish is not None:
            last.prompt_cache, last.all_tokens = self.extract_cache(0), self.tokens[0]
            self.filter([])
        else:
            self._next_tokens = mx.array([following], dtype=self._next_tokens.dtype)
            self._next_logprobs = [following_logprobs]
        responses.append(last)
        return responses
