"""Constrained decoding for ``response_format`` (JSON object / JSON schema) with llguidance.

llguidance compiles the schema into a grammar and, per step, gives the bitmask of tokens that
keep the output valid; we apply it to the logits as an ordinary mlx-lm logits processor. The
output therefore always parses and validates, whatever the model. The end-of-turn token is
allowed only once the JSON is complete.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

# Compact JSON: a free-whitespace grammar lets a small model ramble in spaces and newlines.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: dict[int, LLTokenizer] = {}
_lock = threading.Lock()


class GrammarError(ValueError):
    """The schema cannot be compiled into a grammar."""


def ll_tokenizer(tokenizer: Any) -> LLTokenizer:
    """llguidance's view of a model's tokenizer, built once per tokenizer (~0.3 s)."""
    key = id(tokenizer)
    with _lock:
        if key not in _tokenizers:
            hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper wraps the HF one
            _tokenizers[key] = from_tokenizer(hf, n_vocab=len(tokenizer), eos_token=sorted(tokenizer.eos_token_ids))
        return _tokenizers[key]


def compile_json_schema(tokenizer: Any, schema: dict[str, Any]) -> str:
    """The grammar for ``schema``, validated now so a bad schema is the caller's 400, not a step failure."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    probe = LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
    if probe.is_error():
        raise GrammarError(probe.get_error())
    return grammar


class GrammarProcessor:
    """A logits processor: masks every token the grammar does not allow next.

    Created per request; called on the engine thread with the tokens generated so far.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        self._matcher = LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        self._consumed = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        new = tokens.tolist()[self._consumed:] if tokens.size else []
        for token in new:
            if not self._matcher.consume_token(int(token)):
                raise ValueError(f"grammar rejected token {token}: {self._matcher.get_error()}")
        self._consumed += len(new)
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        vocab = logits.shape[-1]
        allowed = np.zeros(vocab, dtype=bool)
        allowed[: min(vocab, bits.size)] = bits[:vocab].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))
