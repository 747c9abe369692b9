"""What every BERT-family encoder shares: its config, its pooling, and the batching and pooling of
``EncoderModel`` (the BERT family's layers are in encoder.py, nomic_bert's in encoder_nomic.py).
Runs on the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

BATCH = 32  # inputs per forward pass at most; padded to the longest in the batch


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> EncoderConfig:
        fields = set(cls.__dataclass_fields__)
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        values["model_type"] = str(config["model_type"]).lower().replace("_", "-")
        return cls(**values)

    @property
    def roberta_positions(self) -> bool:
        # RoBERTa counts positions from pad_token_id + 1, so two position rows are never used.
        return self.model_type != "bert"

    @property
    def max_tokens(self) -> int:
        offset = self.pad_token_id + 1 if self.roberta_positions else 0
        return self.max_position_embeddings - offset


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = True
    source: str = "default (no sentence-transformers modules.json)"

    def describe(self) -> str:
        return f"{self.mode} pooling{', L2-normalised' if self.normalize else ''} ({self.source})"


class EncoderModel(nn.Module):
    """Token ids in, one pooled (and optionally normalised) vector per input out: the batching and
    pooling every encoder shares. Subclasses hold the layers and compute ``hidden_states``."""

    weight_prefixes: tuple[str, ...] = ("embeddings.", "encoder.")  # the checkpoint's tensors we use

    def __init__(self, config: EncoderConfig, pooling: Pooling, matryoshka: bool = False) -> None:
        super().__init__()
        self.config = config
        self.pooling = pooling
        self.matryoshka = matryoshka  # trained so that leading dimensions embed on their own

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size

    def hidden_states(self, ids: mx.array, lengths: mx.array) -> mx.array:
        """Final hidden states of right-padded ``ids`` (batch, tokens); padding never attended to."""
        raise NotImplementedError

    def pool(self, hidden: mx.array, lengths: mx.array) -> mx.array:
        hidden = hidden.astype(mx.float32)
        if self.pooling.mode == "cls":
            pooled = hidden[:, 0]
        elif self.pooling.mode == "lasttoken":
            pooled = mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        else:
            valid = (mx.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(mx.float32)
            pooled = (hidden * valid[..., None]).sum(axis=1) / lengths[:, None].astype(mx.float32)
        if self.pooling.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        # Similar lengths batch together, so little of each forward pass is padding.
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        vectors: list[list[float]] = [[] for _ in inputs]
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            for i, row in zip(chunk, self.embed_batch([inputs[i] for i in chunk]), strict=True):
                vectors[i] = row
        return vectors

    def embed_batch(self, inputs: list[list[int]]) -> list[list[float]]:
        """One forward pass over ``inputs``, right-padded to the longest: the unit of work the
        engine schedules between decode steps (engine/embeddings.py's EmbeddingJob)."""
        width = max(len(ids) for ids in inputs)
        pad = self.config.pad_token_id
        ids = mx.array([tokens + [pad] * (width - len(tokens)) for tokens in inputs])
        lengths = mx.array([len(tokens) for tokens in inputs])
        return cast(list[list[float]], self.pool(self.hidden_states(ids, lengths), lengths).tolist())  # 2-D
