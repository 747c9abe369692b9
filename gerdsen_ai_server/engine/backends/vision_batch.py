"""The rows of one vision-language model decoded together (continuous batching on mlx-vlm 0.7.10).

A request joins the batch whenever it comes: its prompt (vision tower included) is prefilled alone
by mlx-vlm's own ``generate_step`` into a KV cache of its own, which gives its first token exactly as
``mlx_vlm.generate`` does; then its cache is merged into the batch's (mlx-vlm's ``BatchKVCache``: left
padded, per-row offsets) and it decodes one token a step beside the others. Its rotary offset goes
with it: Qwen-VL language models keep the prompt's mRoPE delta (``_rope_deltas``) on the model object,
which the next prompt's prefill overwrites, so each row's delta is read right after its prefill and
the batch passes them all, per row, to every decode step, as mlx-vlm's own ``GenerationBatch`` does.

Sampling is per row, unlike mlx-vlm's ``BatchGenerator`` (one sampler for its whole batch): each row
has the sampler ``generate_step`` would build for its request (``RowSampler``), applied to its own
row of the step's logits after its own logits processors. A seed keys each draw by the token's
position alone (mlx-vlm's positioned sampler), so a seeded request gives the same tokens with or
without batch mates, as on the MLX text path (sampling.py). Like mlx-vlm's batch, this runs models
whose decode needs nothing but the cache and the rope deltas (not cross-attention families).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx

from gerdsen_ai_server.engine.protocol import SamplingParams
from gerdsen_ai_server.engine.sampling import LogitsProcessor


class RowSampler:
    """One request's sampling, built as mlx-vlm's ``generate_step`` builds it from the same arguments:
    greedy at temperature 0, mlx-vlm's positioned (stateless, seed-and-position keyed) sampler for a
    seed, else its ``make_sampler``. ``position`` is the count of tokens the request generated before."""

    def __init__(self, params: SamplingParams) -> None:
        from mlx_vlm.generate.ar import _PositionedTargetSampler
        from mlx_vlm.sample_utils import clamp_temperature, make_sampler

        temperature = clamp_temperature(params.temperature)
        self.greedy = temperature == 0
        self._sampler: Any
        if params.seed is not None and temperature > 0 and params.min_p == 0:
            self._sampler = _PositionedTargetSampler(
                temperature=temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed
            )
        else:
            self._sampler = make_sampler(temp=temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)

    def sample(self, logprobs: mx.array, position: int) -> mx.array:
        from mlx_vlm.generate.ar import _sample_with_positions

        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return _sample_with_positions(self._sampler, logprobs, row_ids=[0], positions=[position])


@dataclass(eq=False)  # identity: rows are told apart as objects, never by their arrays' values
class Row:
    """A decoding request: its sampler, its processors (seeing its generated tokens only), the token it
    is to feed next and that token's log-probabilities."""

    owner: Any  # the backend's job
    sampler: RowSampler
    processors: list[LogitsProcessor]
    generated: list[int] = field(default_factory=list)
    logprobs: mx.array | None = None  # 1-D, of the last sampled token's step


def _batched(entry: Any) -> Any:
    """A one-row cache as its batch kind (KVCache -> BatchKVCache, left padded), a batch cache as is."""
    return entry if callable(getattr(entry, "filter", None)) else type(entry).merge([entry])


def prefill(
    model: Any,
    prompt: list[int],
    pixel_values: Any,
    extra: dict[str, Any],
    sampler: RowSampler,
    processors: list[LogitsProcessor],
) -> tuple[int, mx.array, list[Any], mx.array | None]:
    """The prompt prefilled alone by mlx-vlm's ``generate_step`` (its embeddings, chunking, mRoPE
    positions, first sampling: what ``mlx_vlm.generate`` does), stopped before its first decode step.
    Returns the first token, its log-probabilities, the prompt's KV cache and its rope delta (None: the
    model keeps none). Engine thread only."""
    from mlx_vlm.generate import generate_step
    from mlx_vlm.generate.ar import PromptProcessingBatch
    from mlx_vlm.models.cache import make_prompt_cache

    language = model.language_model
    cache = make_prompt_cache(language)
    seen: list[mx.array] = []

    def first(logprobs: mx.array) -> mx.array:
        seen.append(logprobs)
        token = sampler.sample(logprobs, 0)
        seen.append(token)
        return token

    steps = generate_step(
        mx.array([prompt]),
        model,
        pixel_values,
        None,
        max_tokens=0,  # prefill and the first token's sampling, then stop: no decode step runs
        sampler=first,
        logits_processors=processors,
        prompt_cache=cache,
        **extra,
    )
    for _ in steps:  # max_tokens=0 yields nothing
        pass
    logprobs, token = seen
    delta = None
    if hasattr(language, "_rope_deltas"):  # read now: the next prompt's prefill overwrites it
        delta = PromptProcessingBatch._capture_rope_deltas(language, 1)
    mx.eval(token, logprobs, [c.state for c in cache], *([delta] if delta is not None else []))
    return cast(int, token.item()), logprobs.squeeze(0), cache, delta


class VisionBatch:
    """The decoding rows of one model, their merged KV cache and their rope deltas. Engine thread only."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.language = model.language_model
        self.rows: list[Row] = []
        self._cache: list[Any] = []  # per layer: one row's own caches, batch caches once two share them
        self._deltas: mx.array | None = None  # (rows, 1): each row's mRoPE delta

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row, cache: list[Any], delta: mx.array | None) -> None:
        """A prefilled row joins (its cache holds its prompt; its first token is ``generated[-1]``)."""
        if not self.rows:
            self._cache, self._deltas = cache, delta
        else:
            merged = [_batched(c) for c in self._cache]
            for mine, theirs in zip(merged, cache, strict=True):
                mine.extend(_batched(theirs))
            self._cache = merged
            if self._deltas is not None and delta is not None:
                self._deltas = mx.concatenate([self._deltas, delta])
        self.rows.append(row)

    def keep(self, rows: list[Row]) -> None:
        """Keep only ``rows`` (the others finished, failed or were cancelled: their KV goes)."""
        index = [i for i, r in enumerate(self.rows) if r in rows]
        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        if not index:
            self._cache, self._deltas = [], None
            return
        keep = mx.array(index, mx.int32)
        self._cache = [_batched(c) for c in self._cache]  # a lone row's caches cannot lose it: it is in rows
        for c in self._cache:
            c.filter(keep)
        if self._deltas is not None:
            self._deltas = self._deltas[keep]

    def decode(self) -> list[tuple[Row, int]]:
        """One token for every row: one forward pass over the batch, then each row's processors and
        sampler on its own row of the logits. A processor that fails records it (sampling.guarded)."""
        from mlx_vlm.generate.common import generation_stream

        with mx.stream(generation_stream):
            inputs = mx.array([[row.generated[-1]] for row in self.rows])
            kwargs = {"rope_deltas": self._deltas} if self._deltas is not None else {}
            output = self.language(inputs, cache=self._cache, **kwargs)
            logits = (output.logits if hasattr(output, "logits") else output)[:, -1, :]
            tokens = []
            for i, row in enumerate(self.rows):
                row_logits = logits[i : i + 1]
                if row.processors:
                    generated = mx.array(row.generated)
                    for processor in row.processors:
                        row_logits = processor(generated, row_logits)
                logprobs = row_logits - mx.logsumexp(row_logits, axis=-1, keepdims=True)
                row.logprobs = logprobs.squeeze(0)
                tokens.append(row.sampler.sample(logprobs, len(row.generated)))
            sampled = mx.concatenate([t.reshape(1) for t in tokens])
            mx.eval(sampled, [row.logprobs for row in self.rows])
        out = []
        for row, token in zip(self.rows, cast(list[int], sampled.tolist()), strict=True):
            row.generated.append(token)
            out.append((row, token))
        return out
