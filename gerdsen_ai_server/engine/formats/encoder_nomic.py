"""nomic_bert (nomic-embed-text): BERT with rotary positions, one fused QKV projection and a
SwiGLU MLP, post-norm like BERT, under the checkpoint's own tensor names (``emb_ln``,
``encoder.layers.N.attn.Wqkv``, ``mlp.fc11/fc12/fc2``, ``norm1/norm2``). Runs on the engine thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gerdsen_ai_server.engine.formats.encoder_base import EncoderConfig, EncoderModel, Pooling


@dataclass(frozen=True)
class NomicConfig(EncoderConfig):
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    qkv_bias: bool = False
    fc1_bias: bool = False
    fc2_bias: bool = False
    trained_positions: int = 2048

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> NomicConfig:
        refused = {
            "activation_function": (c.get("activation_function", "swiglu"), "swiglu"),
            "rotary_emb_fraction": (c.get("rotary_emb_fraction", 1.0), 1.0),
            "prenorm": (c.get("prenorm", False), False),
            "causal": (c.get("causal", False), False),
        }
        for key, (value, supported) in refused.items():
            if value != supported:
                raise ValueError(f"nomic_bert with {key}={value!r} is not supported (only {supported!r})")
        positions = int(c.get("n_positions") or c.get("max_position_embeddings") or 2048)
        return cls(
            model_type="nomic-bert",
            vocab_size=c["vocab_size"],
            hidden_size=c["n_embd"],
            num_hidden_layers=c["n_layer"],
            num_attention_heads=c["n_head"],
            intermediate_size=c.get("n_inner") or 4 * c["n_embd"],
            max_position_embeddings=positions,
            type_vocab_size=c.get("type_vocab_size", 2),
            layer_norm_eps=c.get("layer_norm_epsilon", 1e-12),
            hidden_act="swiglu",
            pad_token_id=c.get("pad_token_id") or 0,
            rotary_base=float(c.get("rotary_emb_base", 10000.0)),
            rotary_interleaved=bool(c.get("rotary_emb_interleaved", False)),
            qkv_bias=bool(c.get("qkv_proj_bias", False)),
            fc1_bias=bool(c.get("mlp_fc1_bias", False)),
            fc2_bias=bool(c.get("mlp_fc2_bias", False)),
            trained_positions=int(c.get("max_trained_positions") or positions),
        )

    @property
    def max_tokens(self) -> int:
        # Past its trained length the model scales its rotary base; inputs stay within it.
        return min(self.max_position_embeddings, self.trained_positions)


class NomicEmbeddings(nn.Module):
    def __init__(self, c: NomicConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)


class NomicAttention(nn.Module):
    def __init__(self, c: NomicConfig) -> None:
        super().__init__()
        self.heads, self.config = c.num_attention_heads, c
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.qkv_bias)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, t, d = x.shape
        head = d // self.heads
        q, k, v = self.Wqkv(x).reshape(b, t, 3, self.heads, head).transpose(2, 0, 3, 1, 4)
        q, k = (
            mx.fast.rope(
                a, head, traditional=self.config.rotary_interleaved, base=self.config.rotary_base, scale=1.0, offset=0
            )
            for a in (q, k)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(head), mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, t, d))


class NomicMLP(nn.Module):
    def __init__(self, c: NomicConfig) -> None:
        super().__init__()
        self.fc11 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.fc1_bias)
        self.fc12 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.fc1_bias)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.fc2_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.fc11(x) * nn.silu(self.fc12(x)))


class NomicLayer(nn.Module):
    def __init__(self, c: NomicConfig) -> None:
        super().__init__()
        self.attn = NomicAttention(c)
        self.mlp = NomicMLP(c)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.norm1(self.attn(x, mask) + x)
        out: mx.array = self.norm2(self.mlp(x) + x)  # mlx.nn layers' __call__ are unannotated
        return out


class NomicEncoder(nn.Module):
    def __init__(self, c: NomicConfig) -> None:
        super().__init__()
        self.layers = [NomicLayer(c) for _ in range(c.num_hidden_layers)]


class NomicBertModel(EncoderModel):
    weight_prefixes = ("embeddings.", "emb_ln.", "encoder.")

    def __init__(self, config: NomicConfig, pooling: Pooling, matryoshka: bool = False) -> None:
        super().__init__(config, pooling, matryoshka)
        self.embeddings = NomicEmbeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = NomicEncoder(config)

    def hidden_states(self, ids: mx.array, lengths: mx.array) -> mx.array:
        valid = mx.arange(ids.shape[1])[None, :] < lengths[:, None]
        x: mx.array = self.embeddings.word_embeddings(ids) + self.embeddings.token_type_embeddings(mx.zeros_like(ids))
        x = self.emb_ln(x)
        mask = mx.where(valid, 0.0, -math.inf)[:, None, None, :].astype(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x
