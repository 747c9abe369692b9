"""Embeddings computed in the engine's slices (engine/embeddings.py's EmbeddingJob) equal the ones
computed whole: a language model's long input in pieces through a KV cache, an encoder's inputs in
small batches, in any slice size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gerdsen_ai_server.engine.embeddings import EmbeddingJob, embed
from gerdsen_ai_server.engine.formats.encoder import load_encoder
from tests.support.tiny_models import build_tiny_bert, build_tiny_llama


def sliced(model: Any, inputs: list[list[int]], tokens: int) -> tuple[list[list[float]], int]:
    """The job's vectors advanced ``tokens`` at a time, and how many slices that took."""
    job = EmbeddingJob("m", inputs)
    slices = 1
    while not job.advance(model, tokens):
        slices += 1
        assert job.tokens_done < job.tokens_total
    assert job.tokens_done == job.tokens_total
    return job.vectors, slices


def test_a_language_model_embeds_a_long_input_in_pieces_as_it_does_whole(
    tmp_path: Path, converted_default: Path
) -> None:
    import mlx_lm

    model, _ = mlx_lm.load(str(build_tiny_llama(tmp_path / "llama", converted_default)))
    inputs = [[(7 * i) % 900 + 10 for i in range(90)], [5, 6, 7], [(3 * i) % 500 + 20 for i in range(41)]]
    whole = np.array(embed(model, inputs))
    for tokens in (1, 7, 32):
        vectors, slices = sliced(model, inputs, tokens)
        assert slices >= sum(len(i) for i in inputs) // tokens  # bounded work per slice
        np.testing.assert_allclose(np.array(vectors), whole, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1, rtol=1e-5)


def test_an_encoder_embeds_in_small_batches_as_it_does_whole(tmp_path: Path) -> None:
    model, tokenizer, _ = load_encoder(build_tiny_bert(tmp_path / "bert"), "float32")
    texts = ["the cat sat on the mat", "blue", "a red dog was on the sea", "the sky", "and of the sea"]
    inputs = [tokenizer.encode(t) for t in texts]
    whole = np.array(model.embed(inputs))
    vectors, slices = sliced(model, inputs, 12)
    assert slices > 1
    np.testing.assert_allclose(np.array(vectors), whole, atol=1e-5)
