"""Constrained decoding for ``response_format`` (JSON object / JSON schema) with llguidance.

llguidance compiles the schema into a grammar and, per step, gives the bitmask of tokens that
keep the output valid; we apply it to the logits as an ordinary mlx-lm logits processor. The
output therefore always parses and validates, whatever the model. The end-of-turn token is
allowed only once the JSON is complete.

Schemas from ``response_format`` ``json_schema``, Responses ``text.format`` and forced tool calls are
enforced with OpenAI's strict-mode semantics (``strict_schema``): an object takes no property beyond
those it declares unless the schema itself says so (``additionalProperties`` true or a schema, or
``patternProperties``). JSON Schema's own default is "anything goes", and a small model used that
freedom to copy the schema into its answer (``{"input": 3, "exclusiveMaximum": 1000, "type": ...}``)
or to wander into nested ``"properties"`` until ``max_tokens``.

Keywords: llguidance enforces ``type`` (lists too, ``"null"`` included), ``properties``, ``required``,
``additionalProperties``, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf``, ``$ref`` into ``$defs``/
``definitions``, ``items``/``prefixItems``/``minItems``/``maxItems``, ``minimum``/``maximum`` and their
exclusive forms, ``minLength``/``maxLength``/``pattern`` and common ``format``s. Annotations
(``title``, ``description``, ``default``, ``examples``, ``deprecated``, ``$comment``, ``x-*``...) are
ignored, as they change no valid value. OpenAPI's ``nullable: true`` becomes ``"null"`` in ``type``.
The few assertions llguidance cannot enforce (``uniqueItems``, ``not``, ``contains``, ``if``/``then``,
``propertyNames``, ``dependentRequired``, ``unevaluatedProperties``) are a 400 naming them, as
OpenAI's strict mode refuses unsupported keywords: ignoring one would return output that does not
validate against the schema the client sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, cast

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


# Keywords whose value is one subschema, a map of name -> subschema, or a list of subschemas.
_ONE = (
    "items",
    "additionalProperties",
    "not",
    "contains",
    "if",
    "then",
    "else",
    "propertyNames",
    "additionalItems",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")


def map_schema(schema: Any, fn: Callable[[dict[str, Any], bool], dict[str, Any]], in_all_of: bool = False) -> Any:
    """``schema`` rebuilt bottom-up with ``fn(subschema, in_all_of)`` applied to every (sub)schema
    object. Only keyword positions are schemas: a property *named* ``$ref`` or ``type`` is left alone."""
    if not isinstance(schema, dict):
        return schema  # true / false / a malformed value: llguidance judges it
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE:
            out[key] = (
                [map_schema(v, fn) for v in value]
                if key == "items" and isinstance(value, list)
                else map_schema(value, fn)
            )
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: map_schema(sub, fn) for name, sub in value.items()}
        elif key in _LIST and isinstance(value, list):
            out[key] = [map_schema(sub, fn, key == "allOf") for sub in value]
        else:
            out[key] = value
    return fn(out, in_all_of)


def _strict_one(schema: dict[str, Any], in_all_of: bool) -> dict[str, Any]:
    kind = schema.get("type")
    if schema.get("nullable") is True and kind is not None:  # OpenAPI 3.0's spelling of ["...", "null"]
        kinds = kind if isinstance(kind, list) else [kind]
        schema["type"] = kinds if "null" in kinds else [*kinds, "null"]
        kind = schema["type"]
    is_object = (
        kind == "object" or (isinstance(kind, list) and "object" in kind) or (kind is None and "properties" in schema)
    )
    # allOf members are intersected: "no other keys" on one would forbid the keys the others declare
    # (and on the schema holding the allOf, the keys its members declare), so those keep JSON Schema's default.
    if is_object and not in_all_of and not {"additionalProperties", "patternProperties", "allOf"} & schema.keys():
        schema["additionalProperties"] = False
    return schema


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with OpenAI strict mode's reading: an object without ``additionalProperties``
    takes only its declared properties (a schema with ``additionalProperties`` true or a schema
    keeps it). Required properties, enums, consts, anyOf, $ref and type lists are llguidance's."""
    return map_schema(schema, _strict_one)  # type: ignore[no-any-return]


def compile_json_schema(tokenizer: Any, schema: dict[str, Any]) -> str:
    """The grammar for ``schema``, validated now so a bad schema is the caller's 400, not a step failure.
    Callers pass ``strict_schema(...)`` of a client's schema; ``{"type": "object"}`` for json_object."""
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
        new = cast(list[int], tokens.tolist())[self._consumed :] if tokens.size else []  # 1-D token ids
        for token in new:
            if not self._matcher.consume_token(int(token)):
                raise ValueError(f"grammar rejected token {token}: {self._matcher.get_error()}")
        self._consumed += len(new)
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        vocab = logits.shape[-1]
        allowed = np.zeros(vocab, dtype=bool)
        allowed[: min(vocab, bits.size)] = bits[:vocab].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))
