"""The batched quantized KV cache (engine/quantized_cache.py) against mlx-lm's f16 ``BatchKVCache``.

Every cache operation BatchGenerator uses (merge of per-sequence caches with history, a
right-padded prefill and its ``finalize``, decode, ``extend`` by a joining batch, ``filter`` as
sequences leave, ``extract``, ``trim``) is applied to both caches with the same keys and values:
offsets, padding and indices must be identical, the dequantized content within the quantization
error. Then mlx-lm's own BatchGenerator on a small random llama: staggered joins give each
sequence the tokens it gets alone, and the same as mlx-lm's one-sequence ``QuantizedKVCache``.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache
from mlx_lm.models.llama import Model, ModelArgs

from gerdsen_ai_server.engine.options import InvalidLoadOption
from gerdsen_ai_server.engine.quantized_cache import (
    BatchQuantizedKVCache,
    QuantizedCache,
    bits_for,
    charged_bytes,
    fits,
    kv_bytes_per_token,
    new_caches,
    unsupported,
)
from gerdsen_ai_server.engine.speculative import repad

HEADS, DIM = 3, 64
# |x - dequantize(quantize(x))| <= half a step of the group's range; N(0, 1) rows span < 9.
TOLERANCE = {8: 9 / 255, 4: 9 / 15}


def kv(batch: int, length: int) -> tuple[mx.array, mx.array]:
    return mx.random.normal((batch, HEADS, length, DIM)), mx.random.normal((batch, HEADS, length, DIM))


def same(ref: BatchKVCache, quant: BatchQuantizedKVCache, bits: int) -> None:
    assert quant.left_padding.tolist() == ref.left_padding.tolist()
    assert quant.offset.tolist() == ref.offset.tolist()
    assert quant._idx == ref._idx  # noqa: SLF001
    (rk, rv), (qk, qv) = ref.keys_and_values(), quant.keys_and_values()
    for r, q in ((rk, qk), (rv, qv)):
        content = mx.dequantize(*q, group_size=64, bits=bits)
        for row, pad in enumerate(ref.left_padding.tolist()):
            if pad < ref._idx:  # noqa: SLF001
                error = mx.abs(r[row, :, pad:] - content[row, :, pad:]).max().item()
                assert 0 < error <= TOLERANCE[bits]  # > 0: it really is quantized


@pytest.mark.parametrize("bits", [8, 4])
def test_every_batch_operation_matches_the_f16_batch_cache(bits: int) -> None:
    mx.random.seed(bits)
    plain: list[Any] = []
    quantized: list[Any] = []
    for length in (5, 0, 9):  # sequences with history from the prompt cache, and a new one
        r, q = KVCache(), QuantizedCache(64, bits)
        if length:
            k, v = kv(1, length)
            r.update_and_fetch(k, v)
            q.update_and_fetch(k, v)
        plain.append(r)
        quantized.append(q)
    ref, quant = BatchKVCache.merge(plain), QuantizedCache.merge(quantized)
    assert isinstance(quant, BatchQuantizedKVCache) and quant.bits == bits
    same(ref, quant, bits)

    k, v = kv(3, 4)  # a right-padded prefill of 4, 2 and 3 tokens, rolled into place by finalize
    for c in (ref, quant):
        c.prepare(lengths=[4, 2, 3], right_padding=[0, 2, 1])
        c.update_and_fetch(k, v)
        c.finalize()
    same(ref, quant, bits)

    k, v = kv(3, 1)
    ref.update_and_fetch(k, v)
    quant.update_and_fetch(k, v)
    same(ref, quant, bits)

    joining_ref, joining = BatchKVCache.merge([KVCache()]), QuantizedCache.merge([QuantizedCache(64, bits)])
    k, v = kv(1, 20)  # a longer sequence joins mid-batch
    joining_ref.update_and_fetch(k, v)
    joining.update_and_fetch(k, v)
    ref.extend(joining_ref)
    quant.extend(joining)
    same(ref, quant, bits)

    ref.filter([1, 3])  # two leave; the padding every remaining row has goes
    quant.filter([1, 3])
    same(ref, quant, bits)
    assert min(quant.left_padding.tolist()) == 0

    for i in range(2):
        a, b = ref.extract(i), quant.extract(i)
        assert isinstance(b, QuantizedCache) and b.offset == a.offset == b.size()
        assert mx.abs(a.keys - mx.dequantize(*b.keys, group_size=64, bits=bits)).max().item() <= TOLERANCE[bits]
        assert QuantizedKVCache.from_state(b.state).offset == b.offset  # mlx-lm reads its state back

    assert ref.trim(2) == quant.trim(2) == 2
    same(ref, quant, bits)
    assert quant.nbytes / ref.nbytes == (64 * bits / 8 + 2 * 4) / (64 * 4)  # fp32 here: 0.28x at 8, 0.16x at 4


def test_extending_batches_of_new_sequences_and_merging_empty_caches() -> None:
    empty = QuantizedCache.merge([QuantizedCache(64, 8), QuantizedCache(64, 8)])
    assert empty.keys is None and empty.nbytes == 0 and empty.offset.tolist() == [0, 0]
    empty.extend(QuantizedCache.merge([QuantizedCache(64, 8)]))
    assert empty.offset.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="different bits"):
        a, b = QuantizedCache(64, 8), QuantizedCache(64, 4)
        for c in (a, b):
            c.update_and_fetch(*kv(1, 2))
        QuantizedCache.merge([a, b])


def small_llama(hidden: int = 128, heads: int = 2) -> Model:
    mx.random.seed(0)
    args = ModelArgs.from_dict(
        {
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": 2,
            "intermediate_size": 256,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "rms_norm_eps": 1e-5,
            "vocab_size": 256,
            "tie_word_embeddings": True,
        }
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def generate(model: Model, prompts: list[list[int]], bits: int, joins: dict[int, int]) -> list[list[int]]:
    """Greedy answers of 12 tokens; prompt i joins at step ``joins[i]`` (0: at the start)."""
    generator = BatchGenerator(model, max_tokens=12, completion_batch_size=8, prefill_batch_size=8)
    uids: dict[int, int] = {}
    out: dict[int, list[int]] = {}
    step = 0
    while len(out) < len(prompts) or any(len(t) < 12 for t in out.values()):
        for i, at in joins.items():
            if at == step:
                (uids[i],) = generator.insert([prompts[i]], caches=[new_caches(model, bits)])
                out[uids[i]] = []
        for r in generator.next()[1]:
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                assert isinstance(r.prompt_cache[0], QuantizedCache)  # what the prompt cache stores
        step += 1
    return [out[uids[i]] for i in range(len(prompts))]


@pytest.mark.parametrize("bits", [8, 4])
def test_batch_generator_with_staggered_joins_answers_as_alone(bits: int) -> None:
    model = small_llama()
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [20, 21, 22, 23, 24, 25, 26, 27], [40, 41]]
    batched = generate(model, prompts, bits, {0: 0, 1: 0, 2: 3, 3: 7})
    alone = [generate(model, [p], bits, {0: 0})[0] for p in prompts]
    assert batched == alone
    cache = [QuantizedKVCache(64, bits) for _ in model.layers]  # mlx-lm's one-sequence quantized cache
    tokens = list(prompts[2])
    logits = model(mx.array(tokens)[None], cache=cache)
    for _ in range(12):
        tokens.append(int(logits[0, -1].argmax().item()))
        logits = model(mx.array(tokens[-1:])[None], cache=cache)
    assert tokens[len(prompts[2]) :] == alone[2]


@pytest.mark.parametrize("bits", [8, 4])
def test_prompt_chunks_take_the_fused_attention_and_decode_steps_the_quantized_one(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow path a 2,048-token prompt took (mlx-lm's unfused quantized attention over the whole
    chunk) must not come back: a multi-token step hands the attention dense keys and hides ``bits``,
    so only one-token steps reach ``quantized_scaled_dot_product_attention``; the cache still holds
    the quantized triples, and the answer is the same as mlx-lm's one-sequence QuantizedKVCache
    (the staggered-joins test above)."""
    from mlx_lm.models import base

    seen: list[int] = []
    quantized_attention = base.quantized_scaled_dot_product_attention

    def spy(queries: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        seen.append(int(queries.shape[2]))
        return quantized_attention(queries, *args, **kwargs)

    monkeypatch.setattr(base, "quantized_scaled_dot_product_attention", spy)
    model = small_llama()
    assert len(generate(model, [list(range(1, 40)), [7, 8, 9]], bits, {0: 0, 1: 0})[0]) == 12
    assert seen and set(seen) == {1}  # decode steps only: no prompt chunk went the quantized way

    cache = QuantizedCache.merge([QuantizedCache(64, bits)])
    keys, values = cache.update_and_fetch(*kv(1, 5))
    assert not hasattr(cache, "bits") and keys.shape == values.shape == (1, HEADS, 5, DIM)
    assert isinstance(cache.keys, tuple) and cache.keys[0].dtype == mx.uint32  # stored quantized
    assert mx.array_equal(keys, mx.dequantize(*cache.keys_and_values()[0], group_size=64, bits=bits))
    keys, _ = cache.update_and_fetch(*kv(1, 1))
    assert cache.bits == bits and isinstance(keys, tuple)  # a decode step: the quantized triples


def test_which_models_and_caches_fit(caplog: pytest.LogCaptureFixture) -> None:
    assert unsupported(small_llama()) is None
    narrow = small_llama(hidden=64, heads=2)  # head size 32
    assert "head size 32" in (unsupported(narrow) or "")
    with pytest.raises(InvalidLoadOption) as info:
        bits_for(narrow, 4, 0)
    assert info.value.param == "kv_bits"
    with caplog.at_level(logging.WARNING):
        assert bits_for(narrow, None, 8) == 0  # IMPETUS_KV_BITS alone: unquantized, said in the log
    assert "IMPETUS_KV_BITS=8: this model keeps its f16 KV cache" in caplog.text
    assert bits_for(small_llama(), None, 8) == 8 and bits_for(small_llama(), 0, 8) == 0
    quantized = new_caches(small_llama(), 4)
    assert len(quantized) == 2 and fits(quantized, 4) and not fits(quantized, 8) and not fits(quantized, 0)
    assert fits([KVCache()], 0) and not fits([KVCache()], 4) and fits(None, 4)
    config = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}
    f16 = kv_bytes_per_token(config, 0)
    assert f16 == 23040  # llama.cpp's figure for the same model (docs/llamacpp.md)
    assert kv_bytes_per_token(config, 8) / f16 <= 0.55 and kv_bytes_per_token(config, 4) / f16 <= 0.3


def test_the_registry_charges_the_quantized_kv_bytes_when_it_chooses_the_dtype() -> None:
    """Under IMPETUS_COMPUTE_DTYPE=auto on a CPU a model computes in float32 only where its float32
    weights and KV cache at its context fit (engine/dtype.py): with kv_bits 4 that KV cache is 0.16x,
    so a budget between the two needs gives float32 with kv_bits 4 and not without."""
    from gerdsen_ai_server.engine import dtype
    from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
    from gerdsen_ai_server.engine.options import LoadOptions
    from gerdsen_ai_server.engine.registry import ModelRegistry
    from gerdsen_ai_server.events import EventBus
    from tests.support.models import default_model_folder

    path = default_model_folder()
    loader = LoaderFactory()
    registry = ModelRegistry(
        loader=loader,
        models_dir=path.parent,
        compute_dtype=None,
        budget_bytes=0,
        keep_alive=0,
        open_backend=lambda loaded: None,  # type: ignore[arg-type,return-value]
        events=EventBus(),
        on_unload=lambda model_id: None,
    )
    fp32, context = loader.estimate_bytes(path, "float32"), loader.context_of(path)
    per_token = dtype.kv_bytes_per_token(path, 4)
    need = {bits: fp32 + charged_bytes(per_token, 4, bits) * context for bits in (0, 4)}
    assert charged_bytes(per_token, 4, 4) == per_token * (0.5 + 8 / 64) // 4  # 0.16x of a float32 cache
    registry.budget_bytes = (need[0] + need[4]) // 2
    assert registry.choose_dtype(path, LoadOptions(kv_bits=4)).dtype == "float32"
    assert registry.choose_dtype(path, LoadOptions(kv_bits=0)).dtype != "float32"


def rows_of(cache: Any) -> list[list[Any]]:
    """Each row's cached tokens as numpy arrays (its span past its left padding), one per KV array."""
    arrays = [*cache.keys, *cache.values] if isinstance(cache.keys, tuple) else [cache.keys, cache.values]
    pads = cache.left_padding.tolist()
    return [[np.array(a[row, :, pad : cache._idx]) for a in arrays] for row, pad in enumerate(pads)]  # noqa: SLF001


@pytest.mark.parametrize("bits", [0, 8])
def test_repad_keeps_each_rows_accepted_prefix(bits: int) -> None:
    """Speculation's ``repad`` (engine/speculative.py) on the plain batch cache and the quantized one
    (whose (data, scales, biases) triples it did not know, so a quantized batch speculated only
    with one sequence): after verification passes that fed every row 4 tokens and kept 1-4 of them,
    each row holds exactly its earlier tokens and its kept ones, its RoPE offset is its length, and
    the padding all rows share is dropped (the second pass leaves every row padded: a row that kept
    the longest run moves left, one whose shift cancels that drop stays where it is)."""
    mx.random.seed(3)
    singles: list[Any] = []
    for length in (6, 9, 3, 9):
        single = QuantizedCache(64, bits) if bits else KVCache()
        single.update_and_fetch(*kv(1, length))
        singles.append(single)
    cache = QuantizedCache.merge(singles) if bits else BatchKVCache.merge(singles)
    assert isinstance(cache, BatchQuantizedKVCache if bits else BatchKVCache)
    for kept, common in (([1, 4, 2, 4], 0), ([4, 1, 1, 2], 2)):
        before, offsets = rows_of(cache), cache.offset.tolist()
        cache.update_and_fetch(*kv(4, 4))
        fed = rows_of(cache)
        idx = cache._idx  # noqa: SLF001
        repad([cache], 4, kept)
        assert cache._idx == idx - 4 + max(kept) - common  # noqa: SLF001
        for row, (old, new) in enumerate(zip(before, rows_of(cache), strict=True)):
            length = old[0].shape[1] + kept[row]
            assert cache.offset.tolist()[row] == offsets[row] + kept[row]
            assert cache.left_padding.tolist()[row] + length == cache._idx  # noqa: SLF001
            for grown, now in zip(fed[row], new, strict=True):
                assert np.array_equal(now, grown[:, :length]), (kept, row)
    assert cache.left_padding.tolist() == [4, 1, 9, 0]  # moved -2, +1, +1 and 0 by the second pass
