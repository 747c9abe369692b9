"""Per-request samplers and logits processors (stop strings are matched in text.py).

Sampling itself is mlx-lm's (``make_sampler``, ``apply_top_p`` …, ``make_logits_processors``);
what this adds is a *seeded* sampler that owns its own PRNG key, so a seeded request gives the
same tokens whatever else is in the batch, and a text-level stop matcher that never lets a
stop string (or its first half, split across tokens) reach the client (``StopMatcher``, which
lives with the text step every backend shares, text.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from gerdsen_ai_server.engine.protocol import SamplingParams, TokenLogprob

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _filters(params: SamplingParams) -> list[Callable[[mx.array], mx.array]]:
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < params.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    return filters


def build_sampler(params: SamplingParams) -> Sampler:
    """Greedy at temperature 0 (one shared function, so a greedy batch samples in one call)."""
    if params.temperature == 0:
        return greedy_sampler
    if params.seed is None:
        return make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)

    filters = _filters(params)
    key = mx.random.key(params.seed)

    def seeded_sampler(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1.0 / params.temperature), key=sub)

    return seeded_sampler


def guarded(processors: list[LogitsProcessor], errors: list[Exception], prompt_len: int) -> list[LogitsProcessor]:
    """Processors that see only the generated tokens (mlx-lm hands them the prompt too; penalties,
    like vLLM's, count the output only) and that record a failure instead of raising, so one bad
    request cannot fail the whole batch's step: the engine ends that request alone."""

    def guard(processor: LogitsProcessor) -> LogitsProcessor:
        def run(tokens: mx.array, logits: mx.array) -> mx.array:
            if errors:
                return logits
            try:
                return processor(tokens[prompt_len:], logits)
            except Exception as exc:
                errors.append(exc)
                return logits

        return run

    return [guard(p) for p in processors]


def build_logits_processors(params: SamplingParams, max_tokens: int) -> list[LogitsProcessor]:
    # OpenAI's penalties look at everything generated so far, not a 20-token window.
    return make_logits_processors(
        logit_bias=params.logit_bias,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=max_tokens,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=max_tokens,
    )


def token_logprob(logprobs: mx.array, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability and the ``top`` most likely tokens' (engine thread only)."""
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        values = logprobs[ids]
        order = mx.argsort(-values)
        # 1-D arrays: tolist() is a flat list (mlx's stubs allow any nesting)
        alternatives = list(
            zip(cast(list[int], ids[order].tolist()), cast(list[float], values[order].tolist()), strict=True)
        )
    return TokenLogprob(token, cast(float, logprobs[token].item()), alternatives)
