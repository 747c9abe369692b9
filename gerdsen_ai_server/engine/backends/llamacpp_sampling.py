"""Sampling for the llama.cpp backend: OpenAI's parameters over one sequence's logits, in numpy.

Each sequence samples from its own logits with its own random generator (nothing that runs beside
a seeded request draws from it), applying the parameters as mlx-lm does on MLX (sampling.py): logit
bias, repetition / presence / frequency penalties, the grammar's token mask (llguidance, the same
matcher the MLX grammar processor drives), then top-p, min-p, top-k and temperature.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, TokenLogprob


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    out: np.ndarray = x - (m + np.log(np.exp(x - m).sum()))
    return out


class Sampler:
    """OpenAI's sampling parameters over one sequence's logits, as mlx-lm applies them."""

    def __init__(self, params: SamplingParams, grammar: Any | None) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.counts: Counter[int] = Counter()
        self.grammar = grammar  # an llguidance LLMatcher, or None
        bias = params.logit_bias or {}
        self.bias_ids = np.array(list(bias), dtype=np.int64)
        self.bias_values = np.array(list(bias.values()), dtype=np.float32)

    def process(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32, copy=True)
        p = self.p
        if self.bias_ids.size:
            logits[self.bias_ids] += self.bias_values
        if self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            if p.repetition_penalty and p.repetition_penalty != 1.0:
                sel = logits[ids]
                logits[ids] = np.where(sel < 0, sel * p.repetition_penalty, sel / p.repetition_penalty)
            if p.presence_penalty:
                logits[ids] -= p.presence_penalty
            if p.frequency_penalty:
                logits[ids] -= p.frequency_penalty * np.fromiter(self.counts.values(), dtype=np.float32)
        if self.grammar is not None:
            bits = np.unpackbits(np.frombuffer(self.grammar.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = np.zeros(logits.shape[0], dtype=bool)
            n = min(logits.shape[0], bits.size)
            allowed[:n] = bits[:n].astype(bool)
            logits[~allowed] = -np.inf
        return logits

    def sample(self, logprobs: np.ndarray) -> int:
        p = self.p
        if p.temperature == 0:
            return int(np.argmax(logprobs))
        x = logprobs.copy()
        if 0 < p.top_p < 1.0:  # keep the smallest set whose probability reaches top_p
            order = np.argsort(-x)
            cum = np.cumsum(np.exp(x[order]))
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            x[order[cut:]] = -np.inf
        if p.min_p > 0:
            x[x < x.max() + np.log(p.min_p)] = -np.inf
        if 0 < p.top_k < x.shape[0]:
            kth = np.argpartition(-x, p.top_k - 1)[p.top_k - 1]
            x[x < x[kth]] = -np.inf
        scaled = x / p.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))

    def accept(self, token: int) -> None:
        self.counts[token] += 1
        if self.grammar is not None and not self.grammar.consume_token(token):
            raise ValueError(f"grammar rejected token {token}: {self.grammar.get_error()}")


def grammar_of(request: GenerationRequest) -> Any | None:
    """The llguidance matcher of a request's grammar processor; any other processor is refused."""
    from gerdsen_ai_server.engine.grammar import GrammarProcessor

    matcher = None
    for processor in request.logits_processors:
        if isinstance(processor, GrammarProcessor) and matcher is None:
            matcher = processor._matcher  # noqa: SLF001 - the same matcher, driven with numpy here
        else:
            raise ValueError(f"the llama.cpp backend cannot run the logits processor {processor!r}")
    return matcher


def token_logprob(logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-logprobs, top - 1)[:top]
        ids = ids[np.argsort(-logprobs[ids])]
        alternatives = [(int(i), float(logprobs[i])) for i in ids]
    return TokenLogprob(token, float(logprobs[token]), alternatives)
