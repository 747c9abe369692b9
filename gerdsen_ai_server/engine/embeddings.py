"""Sentence embeddings: from a dedicated embedding model (encoder.py: its own pooling), or from a
language model as mean-pooled, L2-normalised final hidden states.

Runs on the engine thread (it is MLX work). mlx-lm's models expose their transformer body as
``model.model``, whose output is the final-norm hidden state before the LM head.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .encoder import EncoderModel


def hidden_size(model: Any) -> int:
    if isinstance(model, EncoderModel):
        return model.dimensions
    args = getattr(model, "args", None)
    return int(getattr(args, "hidden_size", 0) or 0)


def embed(model: Any, inputs: list[list[int]]) -> list[list[float]]:
    if isinstance(model, EncoderModel):
        return model.embed(inputs)
    body = getattr(model, "model", None)
    if body is None:
        raise ValueError("this model does not expose hidden states for embeddings")
    vectors = []
    for tokens in inputs:  # one at a time: no padding to mask, and inputs are short
        hidden = body(mx.array([tokens]))[0].astype(mx.float32)  # (tokens, hidden)
        pooled = hidden.mean(axis=0)
        vectors.append(pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12))
    mx.eval(vectors)
    return [v.tolist() for v in vectors]
