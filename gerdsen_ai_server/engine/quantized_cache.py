"""A batched quantized KV cache for mlx-lm's BatchGenerator: continuous batching with kv_bits on MLX.

mlx-lm has a quantized cache for one sequence (``QuantizedKVCache``: keys and values kept as
``mx.quantize`` triples, packed uint32 + scales + biases, read by ``quantized_matmul`` in its
attention, ``models/base.py``) and a batched cache of plain arrays (``BatchKVCache``: left-padded
rows, ``prepare`` / ``finalize`` for right-padded prefills, ``filter`` / ``extend`` as sequences
leave and join, ``extract`` / ``merge`` between it and the per-sequence caches the prompt cache
stores), but no batched quantized one: ``QuantizedKVCache`` has no ``merge``, so BatchGenerator
refuses it ("does not yet support batching with history") and mlx_lm.server turns batching off
for ``--kv-bits``. Here batching stays on:

``BatchQuantizedKVCache`` is ``BatchKVCache`` with every array operation applied to each array of
the triples (the bookkeeping of offsets and padding, ``trim`` and the attention mask stay
BatchKVCache's own) and ``bits`` / ``group_size`` attributes, which make mlx-lm's
``scaled_dot_product_attention`` take its quantized path. ``QuantizedCache`` is
``QuantizedKVCache`` (same ``state``, so ``QuantizedKVCache.from_state`` reads it back) with the
``merge`` that batches it and the ``size`` that merge reads. The MLX backend gives every new
sequence a list of empty ``QuantizedCache`` (``new_caches``) instead of mlx-lm's ``KVCache``;
finished sequences come out of the batch as ``QuantizedCache`` into the prompt cache (charged
their quantized bytes against IMPETUS_PROMPT_CACHE_BYTES) and come back from it the same.
Quantization is mlx-lm's: groups of 64 elements along the head dimension, per token, so a
token's quantized K/V do not depend on how the prompt was chunked or batched.

Prefill is fast: a step of more than one token (a prompt chunk) gets the cache dequantized, and the
cache hides its ``bits`` for that step, so the attention is ``mx.fast.scaled_dot_product_attention``
over dense keys (BLAS) rather than mlx-lm's unfused ``quantized_matmul`` path, which on MLX's CPU
backend took 3-5x longer for a 256-token chunk over 2,048 cached tokens: one 2,048-token prompt at
8 bits now prefills in 27 s where it took 95 s (25.6 s unquantized; docs/performance.md). The keys
are still the quantized ones (quantized as they are stored, dequantized for the step), so prefill
and decode see the same K/V, up to float rounding; the memory held between steps stays the quantized triples (the dequantized copy is one
layer's, for one step). A one-token (decode) step keeps mlx-lm's quantized attention, which reads a
quarter (8 bits) or an eighth (4 bits) of the bytes and was 3x faster than dequantizing each step.
mlx-lm's own lever is different: ``mlx_lm.generate --quantized-kv-start`` keeps a plain cache for
the prompt and quantizes it once it passes a length, so its prefill holds the whole unquantized KV
(the memory this cache is for) and its later chunks take the slow path again.

Speculative decoding keeps the batch at full width on this cache too: its verification pass is a
multi-token step (the fused attention above), and speculative.py's ``repad`` moves the rows of all
six arrays (keys' and values' data, scales and biases) as it moves a plain cache's keys and values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, dynamic_roll, make_prompt_cache

from gerdsen_ai_server.engine.options import InvalidLoadOption

log = logging.getLogger(__name__)

GROUP_SIZE = 64  # mlx-lm's kv_group_size default (mlx_lm.generate --kv-group-size)

Triple = tuple[mx.array, mx.array, mx.array]


def head_dim(model: Any) -> int | None:
    """The model's attention head size, from its mlx-lm args (None where they do not say)."""
    args: Any = getattr(model, "args", None)
    dim = getattr(args, "head_dim", None)
    if dim is None and getattr(args, "hidden_size", None) and getattr(args, "num_attention_heads", None):
        dim = args.hidden_size // args.num_attention_heads
    return int(dim) if dim else None


def unsupported(model: Any) -> str | None:
    """Why ``model``'s KV cache cannot be quantized here, or None when it can: every layer must
    cache plain KV (mlx-lm's ``KVCache``; not sliding windows or state-space layers) and the head
    size must be a multiple of the group size (``mx.quantize`` groups along it)."""
    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {"KVCache"}:
        return f"its layers cache {', '.join(sorted(kinds))}, not plain KV"
    dim = head_dim(model)
    if dim is not None and dim % GROUP_SIZE:
        return f"its attention head size {dim} is not a multiple of {GROUP_SIZE}"
    return None


def bits_for(model: Any, asked: int | None, server_default: int) -> int:
    """The KV bits an MLX load of ``model`` gets: its own ``kv_bits`` (``asked``), else
    IMPETUS_KV_BITS. A model whose cache cannot be quantized (``unsupported``) is a 400 naming
    ``kv_bits`` when the load asked, never an f16 cache passed off as quantized; under
    IMPETUS_KV_BITS alone it keeps f16 with a warning (as Ollama falls back to f16 where a model
    cannot take OLLAMA_KV_CACHE_TYPE)."""
    bits = server_default if asked is None else asked
    why = unsupported(model) if bits else None
    if why is None:
        return bits
    if asked:
        raise InvalidLoadOption(f"kv_bits is {bits}, but this model's KV cache cannot be quantized: {why}.", "kv_bits")
    log.warning("IMPETUS_KV_BITS=%d: this model keeps its f16 KV cache (%s)", bits, why)
    return 0


def kv_bytes_per_token(config: dict[str, Any], bits: int, dtype_bytes: int = 2) -> int:
    """KV bytes one token takes in all layers (K and V) from a model's config.json, quantized by
    ``bits`` (0: ``dtype_bytes`` per element; see ``charged_bytes``)."""
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return charged_bytes(2 * int(config["num_hidden_layers"]) * heads * dim * dtype_bytes, dtype_bytes, bits)


def charged_bytes(unquantized: int, dtype_bytes: int, bits: int) -> int:
    """What an ``unquantized`` KV cache of ``dtype_bytes`` elements takes quantized by ``bits`` (0:
    as it is): ``bits``/8 a element plus a scale and a bias of ``dtype_bytes`` per group of 64
    (mx.quantize's layout): 0.53x of f16 at 8 bits, 0.28x at 4 (of float32: 0.28x, 0.16x)."""
    if not bits:
        return unquantized
    elements = unquantized // dtype_bytes
    return elements * bits // 8 + elements // GROUP_SIZE * 2 * dtype_bytes


def new_caches(model: Any, bits: int) -> list[QuantizedCache]:
    """A new sequence's empty per-layer caches."""
    return [QuantizedCache(GROUP_SIZE, bits) for _ in range(len(make_prompt_cache(model)))]


def fits(cache: list[Any] | None, bits: int) -> bool:
    """Whether a prompt-cache entry is a cache of this model's kind (quantized by ``bits``, or plain
    when 0): a stored cache of another kind is never merged into the batch (mlx-lm's merge
    takes the first sequence's class for the whole batch)."""
    if not cache:
        return True
    if bits:
        return all(isinstance(c, QuantizedCache) and c.bits == bits for c in cache)
    return not any(isinstance(c, QuantizedKVCache) for c in cache)


def _zeros(shape: tuple[int, int, int], dim: int, dtype: mx.Dtype, bits: int, group: int) -> Triple:
    return (
        mx.zeros((*shape, dim * bits // 32), dtype=mx.uint32),
        mx.zeros((*shape, dim // group), dtype=dtype),
        mx.zeros((*shape, dim // group), dtype=dtype),
    )


def _dims(t: Triple, bits: int) -> int:
    return int(t[0].shape[-1]) * 32 // bits  # elements per row, from the packed words


def _cat(a: Triple, b: Triple, axis: int = 0) -> Triple:
    return tuple(mx.concatenate([x, y], axis=axis) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


class QuantizedCache(QuantizedKVCache):
    """mlx-lm's one-sequence quantized cache, which BatchGenerator can now batch (``merge``)."""

    keys: Any  # a Triple once something is cached (mlx-lm declares them by their first value, None)
    values: Any

    def size(self) -> int:
        return int(self.offset)

    @classmethod
    def merge(cls, caches: Sequence[QuantizedKVCache]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


class BatchQuantizedKVCache(BatchKVCache):
    """BatchKVCache whose keys and values are ``mx.quantize`` triples (see the module docstring)."""

    keys: Any  # Triple | None
    values: Any
    left_padding: Any  # mx.array of each row's padding

    def __init__(self, left_padding: list[int], group_size: int = GROUP_SIZE, bits: int = 8) -> None:
        super().__init__(left_padding)
        self.group_size = group_size
        self._bits = bits
        self.dense = False  # the last update_and_fetch returned dequantized keys (a multi-token step)

    @property
    def bits(self) -> int:
        """The quantization bits, absent (AttributeError) while this step's keys are dense: mlx-lm's
        attention takes its quantized path exactly when ``hasattr(cache, "bits")`` (models/base.py)."""
        if self.dense:
            raise AttributeError("bits")
        return self._bits

    def _new(self, shape: tuple[int, int, int], dim: int, dtype: mx.Dtype) -> Triple:
        return _zeros(shape, dim, dtype, self._bits, self.group_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        """Store ``keys`` / ``values`` quantized; return the cache as triples for a one-token step,
        dequantized for a longer one (the fused attention: see the module docstring)."""
        stored = self._store(keys, values)
        self.dense = keys.shape[2] > 1
        if not self.dense:
            return stored
        return tuple(mx.dequantize(*t, group_size=self.group_size, bits=self._bits) for t in stored)

    def _store(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev = self._idx
        steps = keys.shape[2]
        if self.keys is None or prev + steps > self.keys[0].shape[2]:
            batch, heads = keys.shape[:2]
            shape = (batch, heads, (self.step + steps - 1) // self.step * self.step)
            new_k = self._new(shape, keys.shape[3], keys.dtype)
            new_v = self._new(shape, values.shape[3], values.dtype)
            if self.keys is not None:
                if prev % self.step != 0:
                    self.keys, self.values = tree_map(lambda x: x[..., :prev, :], (self.keys, self.values))
                self.keys, self.values = _cat(self.keys, new_k, 2), _cat(self.values, new_v, 2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset = self.offset + steps
        self._idx += steps
        q_keys = mx.quantize(keys, group_size=self.group_size, bits=self._bits)
        q_values = mx.quantize(values, group_size=self.group_size, bits=self._bits)
        for i in range(3):
            self.keys[i][..., prev : self._idx, :] = q_keys[i]
            self.values[i][..., prev : self._idx, :] = q_values[i]
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Triple, Triple]:
        idx = self._idx
        return tree_map(lambda x: x[..., :idx, :], (self.keys, self.values))  # type: ignore[no-any-return]

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = tree_map(
                lambda x: dynamic_roll(x, padding[:, None], axis=2), (self.keys, self.values)
            )
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = int(self.left_padding.min().item())  # shift left to drop the padding every row has
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., shift:, :], (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        full = self if self.keys is not None else other
        heads, dim_k, dim_v = full.keys[0].shape[1], _dims(full.keys, self._bits), _dims(full.values, self._bits)
        dtype = full.keys[1].dtype
        max_idx = max(self._idx, other._idx)
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array]:
            # Right-justify each cache's rows at max_idx, in buffers of one size (BatchKVCache.extend).
            k, v = c.keys, c.values
            if k is None:
                rows = c.offset.shape[0]
                k, v = self._new((rows, heads, 0), dim_k, dtype), self._new((rows, heads, 0), dim_v, dtype)
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k, v = tree_map(lambda x: x[..., :right, :], (k, v))
                right = 0
            if left or right:
                k, v = tree_map(lambda x: mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]), (k, v))
            return k, v, c.left_padding + left

        (k1, v1, p1), (k2, v2, p2) = pad(self), pad(other)
        self.keys, self.values = _cat(k1, k2), _cat(v1, v2)
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int) -> QuantizedCache:
        cache = QuantizedCache(self.group_size, self._bits)
        padding = int(self.left_padding[idx].item())
        end = self._idx
        cache.keys, cache.values = tree_map(
            lambda x: mx.contiguous(x[idx : idx + 1, :, padding:end]), (self.keys, self.values)
        )
        cache.offset = end - padding
        return cache

    @classmethod
    def merge(cls, caches: Sequence[QuantizedKVCache]) -> BatchQuantizedKVCache:
        first = caches[0]
        lengths = [int(c.offset) if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        full: list[Any] = [c for c in caches if c.keys is not None]
        if longest == 0 or not full:  # nothing cached yet: an empty batch cache (BatchKVCache.merge)
            return cls([0] * len(caches), first.group_size, first.bits)
        if any(c.bits != first.bits or c.group_size != first.group_size for c in full):
            raise ValueError("cannot batch KV caches quantized with different bits or group sizes")
        cache = cls(padding, first.group_size, first.bits)
        shape = (len(caches), full[0].keys[0].shape[1], longest)
        dtype = full[0].keys[1].dtype
        keys = cache._new(shape, _dims(full[0].keys, first.bits), dtype)
        values = cache._new(shape, _dims(full[0].values, first.bits), dtype)
        for i, (p, n, c) in enumerate(zip(padding, lengths, caches, strict=True)):
            if c.keys is None:
                continue
            for j in range(3):
                keys[j][i : i + 1, :, p : p + n] = c.keys[j][..., :n, :]
                values[j][i : i + 1, :, p : p + n] = c.values[j][..., :n, :]
        cache.keys, cache.values = keys, values
        cache.offset += longest
        cache._idx = longest
        return cache

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(int(x.nbytes) for x in (*self.keys, *self.values))


__all__ = [
    "GROUP_SIZE",
    "BatchQuantizedKVCache",
    "QuantizedCache",
    "bits_for",
    "charged_bytes",
    "fits",
    "kv_bytes_per_token",
    "new_caches",
    "unsupported",
]
