"""Speculative decoding inside the continuous batch: every speculating sequence drafts, one pass verifies all.

Design (issue 28 item 4): a batch never leaves continuous batching because a request speculates.
``SpeculativeBatch`` is the engine's decode batch (mlxlm.py's ``DecodeBatch``). At a step where at
least one of its sequences asked for speculation and has a draft (prompt lookup's ``NgramIndex`` or
a draft model's ``ModelDrafter``, speculative_draft.py), it runs the model once over a B x (1 + K)
block: each row's pending token (sampled at the last step, not yet in the KV cache) and its draft,
right-padded to the longest draft (a sequence that does not speculate, or drafted nothing, is its
pending token and padding). Each speculating row keeps its own accepted prefix (the rejection rule
of speculative_draft.py); every other row takes its next token from the pass's first position,
through its logits processors and sampler, exactly as a plain step would. Then ``repad`` brings the
KV cache back to one shared length, the way mlx-lm's ``BatchKVCache.finalize`` handles right-padded
prompts: every row is trimmed to the longest kept run, and a row that kept k fewer tokens has its
keys and values shifted right by k and its left padding grown by k (its RoPE positions, ``offset``,
stay its own). mlx_lm.server instead turns batching off for a draft model; vLLM verifies a ragged
batch with per-row lengths, which mlx-lm's attention does not take, hence the re-padding.

Greedy output is the plain decoding's, token for token, in a batch of any mix
(tests/engine/test_speculative.py). Not speculated (decoded one token a step, in the same pass): a
sequence with logits processors (penalties, logit_bias, a grammar), a seeded sampled request (its
tokens must not depend on what else is in the batch). A batch of several speculates on plain
``BatchKVCache`` layers and on the quantized ones of ``kv_bits`` (quantized_cache.py: ``repad`` moves
their (data, scales, biases) triples like plain keys and values); a rotating (sliding window) cache
speculates only while its sequence is alone (``is_trimmable``), as one shared trim suffices there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import Sampler

from gerdsen_ai_server.engine.mlxlm import DecodeBatch
from gerdsen_ai_server.engine.protocol import GenerationRequest, SpeculativeParams
from gerdsen_ai_server.engine.quantized_cache import BatchQuantizedKVCache
from gerdsen_ai_server.engine.speculative_draft import ModelDrafter, NgramIndex, accept_greedy, accept_sampled
from gerdsen_ai_server.engine.stats import EngineStats

RequestOf = Callable[[int], GenerationRequest | None]  # a sequence's request by its uid (None: gone)


@dataclass
class _Plan:
    """One speculating sequence's request and its drafter's state (made at its first step)."""

    request: GenerationRequest
    params: SpeculativeParams
    ngrams: NgramIndex | None = None
    drafter: ModelDrafter | None = None

    def draft(self, tokens: list[int], pending: int, count: int) -> list[int]:
        """Up to ``count`` tokens after ``tokens`` (what the KV cache holds) and the pending token."""
        if self.params.draft is not None:
            if self.drafter is None:
                self.drafter = ModelDrafter(self.params.draft)
            return self.drafter.draft([*tokens[self.drafter.held :], pending], count)
        if self.ngrams is None:
            self.ngrams = NgramIndex(self.params.lookup_min, self.params.lookup_max)
        self.ngrams.extend([*tokens[len(self.ngrams.tokens) :], pending])  # its tokens since its last draft
        return self.ngrams.draft(count)


def _arrays(cache: Any) -> list[mx.array]:
    """A batch cache's KV arrays, all (B, heads, length, ...): keys and values of a ``BatchKVCache``,
    each array of the (packed data, scales, biases) triples of quantized_cache.py's batched cache."""
    keys, values = cache.keys, cache.values
    return [*keys, *values] if isinstance(keys, tuple) else [keys, values]


def repad(caches: list[Any], fed: int, kept: list[int]) -> None:
    """After a pass that fed ``fed`` tokens to every row, keep row i's first ``kept[i]`` of them.

    Every row is trimmed to the longest kept run (``BatchKVCache.trim`` is shared); a row that kept
    g fewer is moved right by g and its left padding grows by g, so its rejected tail becomes padding
    the attention mask hides. The padding every row then has in common is dropped in the same move
    (as ``BatchKVCache.filter`` drops it), so padding does not pile up step after step: row i moves
    by its g less that common padding, and a row whose move is 0 is not touched. Only the rows that
    move are copied, and only their live span (the buffer's room past the last token is never
    read): per array one gather of those rows and one scatter back, in place (MLX writes into the
    buffer the cache alone holds). The whole-buffer gather of every row this replaces cost 1.6-3.6x
    as much (the default model's shapes, 8 rows, 6 of them moving: 242 vs 150 ms a pass on 2 loaded
    CPU cores). A slice copy per moved row was ~1.4x faster still on this CPU, but it is 2 operations
    a row, array and layer (~1,000 a pass at 8 rows), where a GPU pays each one's launch. The plain
    cache's two arrays and the quantized one's six (quantized_cache.py) move alike."""
    longest = max(kept)
    for cache in caches:
        cache.trim(fed - longest)
    grown = [longest - k for k in kept]
    if not any(grown):
        return
    first = caches[0]
    end = int(first._idx)  # noqa: SLF001 - the shared length after the trim
    padding = [p + g for p, g in zip(cast(list[int], first.left_padding.tolist()), grown, strict=True)]
    common = min(padding)
    moves = [g - common for g in grown]  # each row's shift to the right (negative: left)
    rows = [i for i, m in enumerate(moves) if m]
    start = min((padding[i] for i in rows), default=end) - common  # below it, moved rows are padding
    if start < end - common:
        source = max(0, start - max(moves[i] for i in rows))  # the first position a moved row reads
        shift = mx.array([moves[i] + source for i in rows])[:, None, None, None]
        index = mx.clip(mx.arange(start, end - common)[None, None, :, None] - shift, 0, end - source - 1)
        which = mx.array(rows) if len(rows) < len(kept) else slice(None)
        for cache in caches:
            for array in _arrays(cache):
                moved = mx.take_along_axis(array[which, :, source:end], index, axis=2)
                array[which, :, start : end - common] = moved
    grow = mx.array(grown)
    for cache in caches:
        cache.left_padding = cache.left_padding + grow - common  # a fresh array per layer (filter's -= )
        cache.offset = cache.offset - grow
        cache._idx -= common  # noqa: SLF001


class SpeculativeBatch(DecodeBatch):
    """The engine's decode batch, verifying every speculating sequence's draft in one pass."""

    request_of: RequestOf = staticmethod(lambda uid: None)
    stats_of: Callable[[], EngineStats | None] = staticmethod(lambda: None)
    _plans: dict[int, _Plan | None]

    @classmethod
    def create(
        cls, model: Any, sampler: Sampler, request_of: RequestOf, stats_of: Callable[[], EngineStats | None]
    ) -> SpeculativeBatch:
        """An empty batch (mlx-lm's ``empty``) that finds each sequence's request through ``request_of``."""
        batch = cast(SpeculativeBatch, cls.empty(model, sampler))
        batch.request_of, batch.stats_of, batch._plans = request_of, stats_of, {}
        return batch

    def _plan(self, row: int, uid: int) -> _Plan | None:
        """The sequence's plan, None when it does not speculate (decided once, at its first step)."""
        if uid not in self._plans:
            request = self.request_of(uid)
            plan = None
            if request is not None and request.speculative is not None:
                if not request.sampling.seeded and not (self.logits_processors and self.logits_processors[row]):
                    plan = _Plan(request, request.speculative)
            self._plans[uid] = plan
        return self._plans[uid]

    def _may_repad(self) -> bool:
        if len(self.uids) == 1:
            return all(c.is_trimmable() for c in self.prompt_cache)
        return all(type(c) in (BatchKVCache, BatchQuantizedKVCache) for c in self.prompt_cache)

    def next(self) -> list[GenerationBatch.Response]:
        if len(self._plans) > len(self.uids):  # sequences ended: forget their drafters (and draft caches)
            live = set(self.uids)
            self._plans = {uid: plan for uid, plan in self._plans.items() if uid in live}
        plans = [self._plan(row, uid) for row, uid in enumerate(self.uids)]
        if any(plans) and self._may_repad():
            responses = self._speculate(plans)
            if responses is not None:
                return responses
        return super().next()

    def _speculate(self, plans: list[_Plan | None]) -> list[GenerationBatch.Response] | None:
        """One verification pass for the whole batch; None when no row has a draft (the plain step
        runs instead). The KV cache ends holding exactly the tokens returned, as after plain steps."""
        pending = self._next_tokens
        mx.eval(pending, self._next_logprobs)
        firsts = cast(list[int], pending.tolist())
        drafts: list[list[int]] = []
        for row, plan in enumerate(plans):
            room = self.max_tokens[row] - self._num_tokens[row] - 1  # drafts that could still be returned
            count = min(plan.params.num_tokens, room) if plan is not None else 0
            drafts.append(plan.draft(self.tokens[row], firsts[row], count) if plan is not None and count > 0 else [])
        if not any(drafts):
            return None
        width = 1 + max(len(d) for d in drafts)
        block = [[first, *d] + [first] * (width - 1 - len(d)) for first, d in zip(firsts, drafts, strict=True)]
        logits = self.model(mx.array(block, dtype=pending.dtype), cache=self.prompt_cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        runs, followings, following_logprobs = self._verify(plans, drafts, pending, logits, logprobs)
        self.forwarded = True
        stats = self.stats_of()
        if stats is not None:
            stats.speculative_drafted_total += sum(len(d) for d in drafts)
            stats.speculative_accepted_total += sum(len(run) - 1 for run in runs)
            stats.speculative_passes_total += 1
            stats.speculative_rows_total += sum(1 for d in drafts if d)
        return self._respond(runs, drafts, width, followings, following_logprobs, logprobs)

    def _verify(
        self,
        plans: list[_Plan | None],
        drafts: list[list[int]],
        pending: mx.array,
        logits: mx.array,
        logprobs: mx.array,
    ) -> tuple[list[list[int]], list[int], list[mx.array]]:
        """Each row's run (its pending token and accepted drafts), the token after it and that
        token's log-probabilities. A row that does not speculate is a plain step's: its pending
        token, then its logits processors and sampler on the pass's first position."""
        greedy = [p is not None and p.request.sampling.temperature == 0 for p in plans]
        targets = mx.argmax(logprobs, axis=-1) if any(greedy) else None
        chosen: dict[int, tuple[mx.array, mx.array]] = {}  # plain rows: (sampled token, its logprobs)
        for row, plan in enumerate(plans):
            if plan is not None:
                continue
            row_logprobs = logprobs[row, :1]
            processors = self.logits_processors[row] if self.logits_processors else None
            if processors:
                context = self._token_context[row].update_and_fetch(pending[row : row + 1])
                row_logits = logits[row, :1]
                for processor in processors:
                    row_logits = processor(context, row_logits)
                row_logprobs = row_logits - mx.logsumexp(row_logits, axis=-1, keepdims=True)
            sampler = (self.samplers[row] if self.samplers else None) or self.fallback_sampler
            chosen[row] = (sampler(row_logprobs), row_logprobs[0])
        mx.eval([token for token, _ in chosen.values()], *([targets] if targets is not None else []))
        target_rows = cast(list[list[int]], targets.tolist()) if targets is not None else []
        firsts = cast(list[int], pending.tolist())
        runs: list[list[int]] = []
        followings: list[int] = []
        following_logprobs: list[mx.array] = []
        for row, plan in enumerate(plans):
            draft = drafts[row]
            if plan is None:
                token, row_logprobs = chosen[row]
                runs.append([firsts[row]])
                followings.append(cast(int, token.item()))
                following_logprobs.append(row_logprobs)
                continue
            if greedy[row]:
                accepted, following = accept_greedy(target_rows[row], draft)
            else:
                sampler = (self.samplers[row] if self.samplers else None) or self.fallback_sampler
                accepted, following = accept_sampled(plan.request, logprobs[row, : len(draft) + 1], draft, sampler)
            runs.append([firsts[row], *draft[:accepted]])
            followings.append(following)
            following_logprobs.append(logprobs[row, accepted])
        return runs, followings, following_logprobs

    def _respond(
        self,
        runs: list[list[int]],
        drafts: list[list[int]],
        fed: int,
        followings: list[int],
        following_logprobs: list[mx.array],
        logprobs: mx.array,
    ) -> list[GenerationBatch.Response]:
        """Each row's responses, its run ending at the first end token or its max_tokens budget exactly
        as plain steps would end it; the KV cache keeps each row's returned tokens, the rest is cut."""
        finishes: list[str | None] = []
        kept: list[int] = []
        for row, run in enumerate(runs):
            finish: str | None = None
            returned = 0
            for token in run:
                returned += 1
                self._num_tokens[row] += 1
                if self._num_tokens[row] >= self.max_tokens[row]:
                    finish = "length"
                if self._matchers[row].advance(token):
                    finish = "stop"
                if finish is not None:
                    break
            finishes.append(finish)
            kept.append(returned)
            self.tokens[row].extend(run[:returned])
        repad(self.prompt_cache, fed, kept)
        responses: list[GenerationBatch.Response] = []
        keep: list[int] = []
        for row, (run, returned, finish) in enumerate(zip(runs, kept, finishes, strict=True)):
            uid = self.uids[row]
            row_logprobs = [self._next_logprobs[row], *(logprobs[row, j] for j in range(returned - 1))]
            responses += [
                GenerationBatch.Response(uid, token, lp, None, None, None)
                for token, lp in zip(run[: returned - 1], row_logprobs, strict=False)
            ]
            last = GenerationBatch.Response(uid, run[returned - 1], row_logprobs[-1], finish, None, None)
            if finish is not None:
                last.prompt_cache, last.all_tokens = self.extract_cache(row), self.tokens[row]
            else:
                keep.append(row)
                plan = self._plans.get(uid)
                if plan is not None and plan.drafter is not None and drafts[row]:
                    plan.drafter.settle(len(self.tokens[row]))
            responses.append(last)
        self._next_tokens = mx.array(followings, dtype=self._next_tokens.dtype)
        self._next_logprobs = following_logprobs
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses
