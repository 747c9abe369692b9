"""A prompt chunk's attention over a long KV cache on MLX's CPU, computed with NumPy.

Why: MLX has no CPU kernel for ``mx.fast.scaled_dot_product_attention``; on a CPU it runs its composed
fallback (mlx/fast.cpp): the scores materialised, the mask applied by a broadcast ``where``, then
``softmax``, whose ``exp`` MLX's x86 CPU build computes one float at a time (its SIMD layer is scalar
there), on one core. For 420 new tokens over a 4,750-token cache at Qwen2.5-0.5B's shape (14 query heads,
2 KV heads, head size 64) that is 28 M scores a layer: the softmax alone took ~380 ms of CPU against
~25 ms for NumPy's vectorised ``exp``. Here the same arithmetic runs in NumPy: each KV head's scores are
one GEMM (the query heads that share it folded into its rows), masked and normalised in place, a block of
query positions at a time, so the scores take at most ``BLOCK_SCORES`` floats whatever the cache's length.
Measured on 2 shared cores (load ~3.5): a layer's attention at that shape 0.21 s against 0.69 s, and
420 tokens after 4,330 cached ones prefilled in 8.5 s against 17.5 s, 1.8x a fresh prompt's time against
3.6x (``python -m bench.model --shape qwen2.5-0.5b --probe 4330 --attention ab``); results equal within
float rounding.

Only where it pays and changes nothing else: a float32 prompt chunk (more than one query token, at least
``MIN_SCORES`` scores) on MLX's CPU device, without attention sinks. Decode steps, a GPU (Metal, CUDA),
other dtypes and the quantized KV cache (mlx-lm's ``hasattr(cache, "bits")`` path, quantized_cache.py)
keep mlx-lm's. ``install`` (called by the MLX loader) puts it in place of ``scaled_dot_product_attention``
in a model's mlx-lm module, which imports it by name from ``mlx_lm.models.base``; ``enabled`` turns it
off (the A/B bench).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import base

__all__ = ["enabled", "install", "prefill_attention"]

enabled = True  # the bench's A/B switch: False sends every call to mlx-lm's own attention
# Scores computed per block of query positions, in a buffer each thread keeps (_scores_buffer): 32 MiB of float32.
BLOCK_SCORES = 8 << 20
# Calls with fewer scores keep MLX's: there its composed attention costs little, and each NumPy call hands the
# cores from MLX's BLAS threads to NumPy's and back, which on a loaded 2-core machine cost more than it saved
# (a 6-token speculative check over 512 cached tokens); from about 400 K scores on NumPy's was faster there too.
MIN_SCORES = 1 << 20
_MIN = np.finfo(np.float32).min  # what MLX writes where a boolean mask is False (a fully masked row stays finite)
_local = threading.local()  # each thread's scores buffer (_scores_buffer): the engine thread's, a test's


def _mask_block(mask: np.ndarray | str | None, start: int, stop: int, offset: int, keys: int) -> np.ndarray | None:
    """Query positions ``start:stop`` of ``mask``, shaped to broadcast against scores (B, KV heads, repeats, n, S):
    a bool or additive array, or None. ``offset`` is where the queries start in the keys (mask "causal")."""
    if mask is None:
        return None
    if isinstance(mask, str):  # "causal": query i sees keys up to offset + i
        return np.arange(offset + start, offset + stop)[:, None] >= np.arange(keys)[None]
    return mask if mask.shape[-2] == 1 else mask[..., start:stop, :]  # a row for all queries, or one each


def _as_5d(mask: np.ndarray, kv_heads: int) -> np.ndarray:
    """A mask broadcastable to (B, query heads, L, S) as one broadcastable to (B, KV heads, repeats, L, S)."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, -1, *mask.shape[2:])


def _scores_buffer(size: int) -> np.ndarray:
    """``size`` float32s of this thread's scores buffer, kept from call to call: a fresh 32 MiB array a block
    was mapped and zeroed by the kernel page by page each time (glibc maps allocations that large), which
    made each layer's attention ~1.5x slower (measured after an MLX call, as in a model's layer)."""
    buffer: np.ndarray | None = getattr(_local, "scores", None)
    if buffer is None or buffer.size < size:
        buffer = _local.scores = np.empty(size, np.float32)
    return buffer[:size]


def prefill_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any) -> mx.array:
    """``mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)`` for float32
    inputs, computed in NumPy (the module docstring); ``mask`` is None, "causal" or an array (bool or additive)
    broadcastable to (B, query heads, L, S), as mlx-lm passes it."""
    batch, heads, length, dims = queries.shape
    kv_heads, cached = keys.shape[1], keys.shape[2]
    repeats = heads // kv_heads
    q = np.asarray(queries).reshape(batch, kv_heads, repeats, length, dims)  # evaluates the layer up to here
    k, v = np.asarray(keys), np.asarray(values)
    full = None
    if isinstance(mask, mx.array):
        full = _as_5d(np.asarray(mask if mask.dtype == mx.bool_ else mask.astype(mx.float32)), kv_heads)
    out = np.empty((batch, kv_heads, repeats, length, v.shape[-1]), np.float32)
    step = max(1, BLOCK_SCORES // (batch * heads * cached))
    for start in range(0, length, step):
        stop = min(start + step, length)
        n = stop - start
        rows = q[:, :, :, start:stop].reshape(batch, kv_heads, repeats * n, dims)
        scores = _scores_buffer(batch * heads * n * cached).reshape(batch, kv_heads, repeats * n, cached)
        np.matmul(rows, k.swapaxes(-1, -2), out=scores)  # one GEMM per KV head: its query heads are its rows
        scores *= np.float32(scale)
        block = _mask_block(full if full is not None else mask, start, stop, cached - length, cached)
        if block is not None:
            view = scores.reshape(batch, kv_heads, repeats, n, cached)
            if block.dtype == np.bool_:
                np.copyto(view, _MIN, where=~block)
            else:
                view += block
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        part = np.matmul(scores, v)
        part /= total
        out[:, :, :, start:stop] = part.reshape(batch, kv_heads, repeats, n, -1)
    return mx.array(out.reshape(batch, heads, length, -1))


def _applies(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, sinks: Any) -> bool:
    return (
        enabled
        and not hasattr(cache, "bits")  # a quantized cache's keys are packed triples: mlx-lm's quantized path
        and isinstance(keys, mx.array)
        and queries.shape[2] > 1
        and queries.shape[0] * queries.shape[1] * queries.shape[2] * keys.shape[2] >= MIN_SCORES
        and sinks is None
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and mx.default_device() == mx.cpu
    )


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's ``base.scaled_dot_product_attention``, with a CPU prompt chunk computed by ``prefill_attention``."""
    if _applies(queries, keys, values, cache, sinks):
        return prefill_attention(queries, keys, values, scale, mask)
    return base.scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def install(model: Any) -> bool:
    """Put ``scaled_dot_product_attention`` in ``model``'s mlx-lm module in place of mlx-lm's (once per module,
    for every model of that architecture: it falls back to mlx-lm's for every call it does not take). True if
    the module calls mlx-lm's by that name. Done on any device: a call checks where it runs."""
    module = sys.modules.get(type(model).__module__)
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is scaled_dot_product_attention:
        return True
    if current is not base.scaled_dot_product_attention:
        return False
    module.scaled_dot_product_attention = scaled_dot_product_attention  # type: ignore[union-attr]
    return True
