"""A model's context length: what it was trained for, what its declared RoPE scaling allows, and the one a load gets.

The trained length comes from the model's own files (config.json's ``max_position_embeddings``
and kin; a GGUF's ``<arch>.context_length``); the scaled bound from the RoPE scaling they declare
(config.json's ``rope_scaling`` / ``rope_parameters`` with a ``factor``; a GGUF's
``<arch>.rope.scaling.*``), computed as vLLM derives its ``max_model_len``: yarn multiplies the
original length, linear and dynamic the trained one, and llama3 / longrope already count the
scaling in ``max_position_embeddings``. The scaling itself is the model's own: mlx-lm and llama.cpp
apply what the files declare; a load only chooses how much of the context it may use.

The rule (``effective``): a load's own ``context_length`` beyond the bound is refused (vLLM refuses
a ``max_model_len`` beyond the derived one unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is set), where the
bound is the trained length, or the scaled one when the load opts in with ``rope_scaling``; the
server default (IMPETUS_CONTEXT_LENGTH) is clamped to each model's bound instead, as Ollama clamps
``num_ctx`` to the trained context, since one setting serves models of every size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.options import InvalidLoadOption

DEFAULT_CONTEXT_LENGTH = 2048  # a model whose files declare no length
# RoPE types whose max_position_embeddings already is the scaled length (vLLM's same list).
_ALREADY_SCALED = ("llama3", "longrope", "su")


@dataclass(frozen=True)
class ModelContext:
    """The lengths a model's files declare."""

    trained: int
    scaled: int | None = None  # the bound with its declared RoPE scaling; None: it declares none
    scaling: str | None = None  # the RoPE scaling's type, for messages

    def effective(self, requested: int, server_default: int, rope_scaling: bool) -> int:
        """The context length a load gets (see the module's docstring), or InvalidLoadOption."""
        if rope_scaling and self.scaled is None:
            raise InvalidLoadOption(
                "rope_scaling is true, but this model declares no RoPE scaling (config.json's rope_scaling "
                "or the GGUF's rope.scaling metadata): its context cannot go beyond the "
                f"{self.trained} tokens it was trained for.",
                "rope_scaling",
            )
        bound = self.scaled if rope_scaling and self.scaled is not None else self.trained
        if requested:
            if requested > bound:
                hint = (
                    f"; its {self.scaling} RoPE scaling allows {self.scaled} with rope_scaling: true"
                    if self.scaled is not None and not rope_scaling and self.scaled > self.trained
                    else ""
                )
                what = "allows with its RoPE scaling" if bound != self.trained else "was trained for"
                raise InvalidLoadOption(
                    f"context_length is {requested}, but this model {what} at most {bound} tokens{hint}.",
                    "context_length",
                )
            return requested
        if server_default:
            return min(server_default, bound)
        return bound


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _scaled(trained: int, kind: str | None, factor: float | None, original: float | None) -> int | None:
    if not kind or kind in ("none", "default") or factor is None or factor <= 1:
        return None
    if kind in _ALREADY_SCALED:
        return trained
    base = original if kind == "yarn" and original else trained
    return max(trained, int(base * factor))


def from_config(config: dict[str, Any]) -> ModelContext:
    """A Hugging Face / MLX folder's lengths, from its config.json (a VLM's ``text_config`` too)."""
    trained = DEFAULT_CONTEXT_LENGTH
    scaling: dict[str, Any] = {}
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                trained = value
                break
        else:
            continue
        found = source.get("rope_scaling") or source.get("rope_parameters")
        scaling = found if isinstance(found, dict) else {}
        break
    kind = scaling.get("rope_type") or scaling.get("type")
    kind = kind if isinstance(kind, str) else None
    scaled = _scaled(
        trained, kind, _positive(scaling.get("factor")), _positive(scaling.get("original_max_position_embeddings"))
    )
    return ModelContext(trained, scaled, kind if scaled is not None else None)


def from_folder(path: Path) -> ModelContext:
    """``from_config`` of a folder's config.json; the default length when it has none."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return ModelContext(DEFAULT_CONTEXT_LENGTH)
    return from_config(config) if isinstance(config, dict) else ModelContext(DEFAULT_CONTEXT_LENGTH)


def from_gguf(meta: dict[str, Any]) -> ModelContext:
    """A GGUF's lengths, from its metadata (what llama.cpp reads: ``<arch>.context_length`` and
    ``<arch>.rope.scaling.type / factor / original_context_length``, or the older ``rope.scale_linear``)."""
    arch = meta.get("general.architecture", "llama")
    trained = int(_positive(meta.get(f"{arch}.context_length")) or DEFAULT_CONTEXT_LENGTH)
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = _positive(meta.get(f"{arch}.rope.scaling.factor"))
    if kind is None and _positive(meta.get(f"{arch}.rope.scale_linear")):
        kind, factor = "linear", _positive(meta.get(f"{arch}.rope.scale_linear"))
    kind = kind if isinstance(kind, str) else None
    scaled = _scaled(trained, kind, factor, _positive(meta.get(f"{arch}.rope.scaling.original_context_length")))
    return ModelContext(trained, scaled, kind if scaled is not None else None)
