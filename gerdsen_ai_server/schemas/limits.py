"""Limits every request body meets before a schema sees it: finite numbers and bounded nesting.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON by RFC 8259) and
turns ``1e999`` into ``inf``; a ``NaN`` that reached a model's ``keep_alive`` made ``/api/models``
invalid JSON for the dashboard and the model never expired. The request schemas refuse non-finite
floats themselves (``allow_inf_nan=False``); this module covers the free-form parts the schemas type
as ``Any`` (tool parameters, JSON schemas, metadata) and the nesting depth: 100,000 nested arrays
were a ``RecursionError`` (a 500) in the parser, and a schema nested a few hundred levels deep would
reach every recursive consumer after it (the grammar compiler, the chat template's ``tojson``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Deep enough for any real tool or output schema (OpenAI allows 10 levels of object nesting in
# structured outputs, about 25 levels of JSON with the request around it), far below Python's
# recursion limit of 1,000 that the JSON encoder, Jinja's ``tojson`` and friends run into.
MAX_JSON_DEPTH = 100


class JSONShapeError(ValueError):
    """A body that parsed but is refused: ``code`` is the error code the API answers with, ``param``
    the dotted path of the offending value (as pydantic's errors name fields), when it has one."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def reject_constant(name: str) -> Any:
    """``parse_constant`` for ``json.loads``: NaN and ±Infinity are refused at parse time."""
    raise JSONShapeError(
        f"The JSON body holds {name}, which is not a JSON number: send a finite number.", "invalid_json"
    )


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuses nesting deeper than ``max_depth`` and non-finite floats anywhere in ``value``.

    Iterative, so the check itself cannot overflow the stack, and linear in the size of ``value``,
    which the body size limit bounds: each container's element types are collected in C first, so
    a list of a million token ids is one ``set(map(type, ...))`` (~20 ms), not a Python loop.
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())] if isinstance(value, dict | list) else []
    while stack:
        node, path = stack.pop()
        if len(path) >= max_depth:
            raise JSONShapeError(
                f"The JSON body is nested more than {max_depth} levels deep.", "nesting_too_deep", str(path[0])
            )
        children = node.values() if isinstance(node, dict) else node
        kinds = set(map(type, children))
        if not kinds & _NEEDS_A_LOOK:
            continue
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(child, dict | list):
                stack.append((child, (*path, key)))
            elif isinstance(child, float) and not math.isfinite(child):
                where = ".".join(map(str, (*path, key)))
                raise JSONShapeError(
                    f"The JSON body holds a non-finite number ({child}) at {where}: send a finite "
                    "number (an overflowing one like 1e999 is infinite too).",
                    "invalid_json",
                    where,
                )
    if isinstance(value, float) and not math.isfinite(value):
        raise JSONShapeError("The JSON body is a non-finite number.", "invalid_json")


# A ``\\ud800``-``\\udfff`` escape in the raw body: the only way a JSON string can hold a lone UTF-16
# surrogate (raw bytes that are not UTF-8 fail to decode before parsing). Only then is the parsed body
# walked again, so the common case costs one regex scan of the bytes.
LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_unicode(value: Any) -> None:
    """Refuses strings holding a lone surrogate: ``json.loads`` accepts ``"\\ud800"``, but it is not a
    Unicode character, and the tokenizer (Rust, UTF-8 only) raised ``TypeError`` on it (a 500)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JSONShapeError(
            "The JSON body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which "
            "is not a Unicode character.",
            "invalid_json",
        ) from None


_NEEDS_A_LOOK = frozenset({dict, list, float})  # what json.loads makes that may nest or be non-finite
