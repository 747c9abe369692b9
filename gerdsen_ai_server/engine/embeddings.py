"""Sentence embeddings: from a dedicated embedding model (encoder.py: its own pooling), or from a
language model as mean-pooled, L2-normalised final hidden states; and a reranker's pair scores
(a cross-encoder: encoder.py's CrossEncoderModel), which go the same way, one score per pair.

Runs on the engine thread (it is MLX work), as an ``EmbeddingJob`` the engine advances a bounded
slice at a time between decode steps: computed whole, one ~4k-token input on the default model held
the engine thread (and every stream it decodes, and every request waiting to be prefilled) for tens
of seconds. mlx-lm's models expose their transformer body as ``model.model``, whose output is the
final-norm hidden state before the LM head; a long input goes through it in pieces with a KV cache,
as a prompt is prefilled in chunks, and the hidden states are summed as they come, so the mean
equals the one-pass mean (attention is causal: a token's state never depends on later pieces).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from gerdsen_ai_server.engine.errors import EmbeddingCancelled as EmbeddingCancelled  # defined with the engine's errors
from gerdsen_ai_server.engine.formats.encoder import CrossEncoderModel
from gerdsen_ai_server.engine.formats.encoder_base import BATCH, EncoderModel


def hidden_size(model: Any) -> int:
    if isinstance(model, EncoderModel):
        return model.dimensions
    args = getattr(model, "args", None)
    return int(getattr(args, "hidden_size", 0) or 0)


def _normalised(total: mx.array, count: int) -> mx.array:
    pooled = total / count
    return pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)


class EmbeddingJob:
    """One embeddings request: its inputs, how far the engine has got, and the future it answers.

    ``advance(model, tokens)`` (engine thread only) computes about ``tokens`` tokens' worth and
    returns whether every input is done. The caller's thread reads ``tokens_done`` for progress and
    may ``cancel()`` at any time; the engine drops a cancelled job before its next slice.
    """

    def __init__(self, model_id: str, inputs: list[list[int]], segments: list[int] | None = None) -> None:
        self.model_id = model_id
        self.inputs = inputs
        # A reranker's pairs: where each input's second text begins (CrossEncoderModel.score_batch);
        # its "vectors" are then one score each.
        self.segments = segments if segments is not None else [len(tokens) for tokens in inputs]
        self.future: Future[list[list[float]]] = Future()
        self.vectors: list[list[float]] = [[] for _ in inputs]
        self.tokens_total = sum(len(tokens) for tokens in inputs)
        self.tokens_done = 0
        self.created = time.monotonic()
        self._cancelled = threading.Event()
        # Encoders: inputs by length, so a slice's batch carries little padding.
        self._order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        self._next = 0  # inputs (in _order for encoders, as given for language models) finished
        # Language models: the long input in progress, in pieces: its KV cache and summed states.
        self._offset = 0
        self._cache: list[Any] | None = None
        self._sum: mx.array | None = None

    # caller side
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._next >= len(self.inputs)

    # engine side
    def advance(self, model: Any, tokens: int) -> bool:
        """About ``tokens`` more tokens of work (at least one input's piece); True once all are done."""
        if isinstance(model, EncoderModel):
            self._advance_encoder(model, tokens)
        else:
            self._advance_language_model(model, tokens)
        return self.done

    def _advance_encoder(self, model: EncoderModel, tokens: int) -> None:
        # One forward pass of up to BATCH inputs whose padded size fits ``tokens`` (at least one:
        # an encoder input is bounded by its position table, a few hundred tokens).
        group = [self._order[self._next]]
        for index in self._order[self._next + 1 : self._next + BATCH]:
            if (len(group) + 1) * len(self.inputs[index]) > tokens:
                break
            group.append(index)
        batch = [self.inputs[i] for i in group]
        if isinstance(model, CrossEncoderModel):
            rows = [[score] for score in model.score_batch(batch, [self.segments[i] for i in group])]
        else:
            rows = model.embed_batch(batch)
        for index, row in zip(group, rows, strict=True):
            self.vectors[index] = row
            self.tokens_done += len(self.inputs[index])
        self._next += len(group)

    def _advance_language_model(self, model: Any, budget: int) -> None:
        body = getattr(model, "model", None)
        if body is None:
            raise ValueError("this model does not expose hidden states for embeddings")
        budget = max(budget, 1)
        pending: list[tuple[int, mx.array]] = []
        while budget > 0 and not self.done:
            tokens = self.inputs[self._next]
            if self._offset == 0 and len(tokens) <= budget:  # whole, in one pass: no cache needed
                hidden = body(mx.array([tokens]))[0].astype(mx.float32)  # (tokens, hidden)
                pending.append((self._next, _normalised(hidden.sum(axis=0), len(tokens))))
                self._next += 1
                budget -= len(tokens)
                self.tokens_done += len(tokens)
                continue
            if self._cache is None:
                self._cache = make_prompt_cache(model)
            piece = tokens[self._offset : self._offset + budget]
            hidden = body(mx.array([piece]), cache=self._cache)[0].astype(mx.float32)
            total = hidden.sum(axis=0)
            self._sum = total if self._sum is None else self._sum + total
            mx.eval(self._sum)  # the piece's work happens in this slice, not in a later one
            self._offset += len(piece)
            budget -= len(piece)
            self.tokens_done += len(piece)
            if self._offset == len(tokens):
                pending.append((self._next, _normalised(self._sum, len(tokens))))
                self._next += 1
                self._offset, self._cache, self._sum = 0, None, None
        if pending:
            mx.eval([vector for _, vector in pending])
            for index, vector in pending:
                self.vectors[index] = cast(list[float], vector.tolist())  # a 1-D array


def embed(model: Any, inputs: list[list[int]]) -> list[list[float]]:
    """All of ``inputs`` at once (tests and tools; the server goes through EmbeddingJob)."""
    job = EmbeddingJob("", inputs)
    while not job.advance(model, 1 << 30):
        pass
    return job.vectors
