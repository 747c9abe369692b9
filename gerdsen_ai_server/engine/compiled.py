"""A llama block's one-token decode step as two compiled halves (``mx.compile``), for float32 models on a CPU.

Why: on MLX's CPU backend ``mx.fast.rms_norm`` and ``mx.fast.rope`` have no kernel of their own; each
falls back to its composed graph (square, sum, rsqrt, broadcasts...; arange, exp, cos, sin, concatenate...),
so a decode step of the embedded default (30 layers) evaluates about 4,000 graph nodes, each scheduled
one by one. Compiled, the elementwise runs fuse, broadcasts vanish and q's and k's shared rope angles are
computed once. The cache update and the attention stay outside (the KV cache grows and mutates in place),
between the two halves: norm + q/k/v projections + rope, then o-projection + residual + norm + MLP +
residual. Prompts (more than one token) take mlx-lm's own path. Figures: ``python -m bench.decode_profile``.

Only plain llama blocks (mlx-lm's ``llama.TransformerBlock`` with bias-free float ``nn.Linear`` layers and
plain ``nn.RoPE``) are compiled; any other model is left as it is.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache, KVCache

__all__ = ["compile_decode", "is_compiled", "uncompile_decode"]

# The caches whose one-token step the halves take: mlx-lm's plain ones. A quantized cache (engine/
# quantized_cache.py subclasses BatchKVCache) returns packed triples and keeps mlx-lm's path.
_PLAIN_CACHES = (KVCache, BatchKVCache)


def _pre(
    x: mx.array, offset: mx.array, norm: mx.array, wq: mx.array, wk: mx.array, wv: mx.array, **shape: Any
) -> tuple[mx.array, mx.array, mx.array]:
    # One token a sequence: (B, 1, D) as (B, D) spares each matmul a flatten and an unflatten, and
    # (B, heads * dims) reshapes straight to (B, heads, 1, dims), no transpose.
    batch = x.shape[0]
    y = mx.fast.rms_norm(x.reshape(batch, -1), norm, shape["eps"])
    rope = partial(
        mx.fast.rope,
        dims=shape["dims"],
        traditional=shape["traditional"],
        base=shape["base"],
        scale=shape["scale"],
        offset=offset,
    )
    heads = shape["heads"]
    q = (y @ wq.T).reshape(batch, heads, 1, -1)
    k = (y @ wk.T).reshape(batch, shape["kv_heads"], 1, -1)
    v = (y @ wv.T).reshape(batch, shape["kv_heads"], 1, -1)
    # One rope over q's and k's heads together: its angles are computed once (rope's CPU fallback
    # builds them anew at every call); each element gets the same arithmetic as by itself.
    qk = rope(mx.concatenate([q, k], axis=1))
    return qk[:, :heads], qk[:, heads:], v


def _post(
    x: mx.array,
    attention: mx.array,
    wo: mx.array,
    norm: mx.array,
    gate: mx.array,
    up: mx.array,
    down: mx.array,
    eps: float,
) -> mx.array:
    batch = x.shape[0]
    h = x.reshape(batch, -1) + attention.reshape(batch, -1) @ wo.T
    y = mx.fast.rms_norm(h, norm, eps)
    out: mx.array = (h + (nn.silu(y @ gate.T) * (y @ up.T)) @ down.T).reshape(x.shape)
    return out


class _Halves:
    """The two compiled functions one model's blocks share (weights are inputs, not captured)."""

    def __init__(self, block: Any, eps: float) -> None:
        attn = block.self_attn
        rope = attn.rope
        shape = {
            "eps": eps,
            "heads": attn.n_heads,
            "kv_heads": attn.n_kv_heads,
            "dims": rope.dims,
            "traditional": rope.traditional,
            "base": rope.base,
            "scale": rope.scale,
        }
        self.pre = mx.compile(partial(_pre, **shape))
        self.post = mx.compile(partial(_post, eps=eps))

    def step(self, block: Any, x: mx.array, mask: Any, cache: Any) -> mx.array:
        attn, mlp = block.self_attn, block.mlp
        offset = cache.offset if isinstance(cache.offset, mx.array) else mx.array(cache.offset)
        q, k, v = self.pre(
            x, offset, block.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        )
        k, v = cache.update_and_fetch(k, v)
        # looked up at each call: attention.py may have put its own in the llama module's name
        out = llama.scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
        return self.post(
            x,
            out,
            attn.o_proj.weight,
            block.post_attention_layernorm.weight,
            mlp.gate_proj.weight,
            mlp.up_proj.weight,
            mlp.down_proj.weight,
        )


class CompiledBlock(llama.TransformerBlock):
    """mlx-lm's llama block whose one-token steps go through ``_Halves``: set as a block's class, so its
    parameters, their names and everything else about it stay mlx-lm's."""

    _halves: _Halves

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if x.shape[1] == 1 and type(cache) in _PLAIN_CACHES:
            return self._halves.step(self, x, mask, cache)
        return super().__call__(x, mask, cache)


def _plain(layer: Any) -> bool:
    if type(layer) is not llama.TransformerBlock:
        return False
    try:  # a later mlx-lm whose block looks otherwise keeps its own path
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        return (
            not layer.use_sliding
            and type(attn.rope) is nn.RoPE
            and type(mlp) is llama.MLP
            and isinstance(attn.n_heads, int)
            and all(type(m) is nn.Linear and "bias" not in m and m.weight.dtype == mx.float32 for m in linears)
        )
    except AttributeError:
        return False


def compile_decode(model: Any) -> bool:
    """Route ``model``'s one-token decode steps through the compiled halves, on a CPU where every block
    is a plain float32 llama block; True if it did. Greedy output is unchanged (tests/engine/test_compiled_decode.py)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if mx.default_device() != mx.cpu or not layers or not all(_plain(layer) for layer in layers):
        return False
    halves = _Halves(layers[0], model.args.rms_norm_eps)
    for layer in layers:
        layer.__class__ = CompiledBlock
        layer._halves = halves
    return True


def uncompile_decode(model: Any) -> None:
    """Undo ``compile_decode`` (the A/B bench compares both on one loaded model)."""
    for layer in model.model.layers:
        if type(layer) is CompiledBlock:
            layer.__class__ = llama.TransformerBlock  # type: ignore[assignment]
            del layer._halves


def is_compiled(model: Any) -> bool:
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return any(type(layer) is CompiledBlock for layer in layers)
