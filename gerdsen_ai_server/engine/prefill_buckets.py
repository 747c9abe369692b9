"""Prefill in padded length buckets, so that a GPU build of MLX reuses the kernels it compiled for a shape.

Why: MLX's CUDA build compiles fused kernels for the shapes it meets, and every prompt has its own
length, so a prompt of a new length pays a compile before its first token (the ~100 ms first token
on an H200 for a millisecond's prefill, docs/performance.md "Reading the GPU run"). Prefilled here,
a group of prompts is right-padded to the next multiple of the bucket (``IMPETUS_PREFILL_BUCKET``,
e.g. 64), not only to its longest prompt as mlx-lm does: lengths 37, 50 and 61 all run as 64.

How it stays exact: mlx-lm's ``PromptProcessingBatch.prompt`` already right-pads a group to its
longest prompt and, after the forward pass, rolls each row's padding to the left of its KV cache
(``BatchKVCache.prepare(right_padding=...)``, ``finalize``), where ``left_padding`` masks it. A real
token never sees the padding after it (the mask is causal), so padding further changes no real
position's keys, values or logits. The tokens the batch records as its KV's content (``tokens``,
what the prompt cache stores) and every extracted cache (``BatchKVCache.extract`` slices the
padding off) hold no padding. Groups whose caches are not BatchKVCaches (rotating windows, SSM
state) go to mlx-lm unchanged: there padding would enter the state.

Peers: vLLM pads CUDA-graph batch sizes to a ladder of capture sizes, and TensorRT-LLM and XLA-based
servers bucket sequence lengths for the same reason (compiled shapes); mlx_lm.server pads only to
the group's longest prompt. The setting's default: on (64) where MLX computes on a GPU, off on a
CPU, where the padded tokens are real compute and nothing is compiled per shape.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

GPU_BUCKET = 64  # IMPETUS_PREFILL_BUCKET's value where MLX computes on a GPU (the setting's -1, auto)


def resolve(setting: int) -> int:
    """The bucket for ``IMPETUS_PREFILL_BUCKET``: itself, or for -1 (auto) 64 on a GPU and 0 (off) on a CPU."""
    if setting >= 0:
        return setting
    return 0 if mx.default_device() == mx.cpu else GPU_BUCKET


def padded_length(longest: int, bucket: int, cap: int) -> int:
    """The length a group whose longest prompt has ``longest`` tokens is prefilled at: the next multiple of
    ``bucket``, never past ``cap`` (the prefill step size: a longer pass would be split in two)."""
    if bucket <= 0 or longest <= 0:
        return longest
    return max(longest, min(-(-longest // bucket) * bucket, cap))


class BucketedPrompts(PromptProcessingBatch):
    """mlx-lm's prompt batch, prefilling each group at a bucketed length (the module docstring)."""

    bucket = 0  # pad to multiples of this (0: as mlx-lm, to the group's longest prompt)

    def prompt(self, tokens: list[list[int]]) -> None:
        if not self.bucket or not tokens:  # off (the CPU default), or a step with nothing to prefill: mlx-lm's
            super().prompt(tokens)
            return
        lengths = [len(t) for t in tokens]
        target = padded_length(max(lengths), self.bucket, self.prefill_step_size)
        caches = self.prompt_cache
        if target == max(lengths) or not all(isinstance(c, BatchKVCache) for c in caches):
            super().prompt(tokens)
            return
        padding = [target - n for n in lengths]
        for cache in caches:  # what mlx-lm's own right padding does (prepare, forward, finalize)
            cache.prepare(right_padding=padding)
        # Equal lengths now, so mlx-lm pads nothing more and leaves the roll (finalize) to us.
        super().prompt([t + [0] * pad for t, pad in zip(tokens, padding, strict=True)])
        for recorded, pad in zip(self.tokens, padding, strict=True):
            del recorded[len(recorded) - pad :]  # the KV's tokens are the prompt's, never the padding
        for cache in caches:
            cache.finalize()
        mx.eval([c.state for c in caches])


def install(generator: BatchGenerator, bucket: int) -> BucketedPrompts:
    """Give ``generator`` a bucketed prompt batch; mlx-lm extends this one object with every group it prefills."""
    batch: BucketedPrompts = BucketedPrompts.empty(
        generator.model, generator.sampler, prefill_step_size=generator.prefill_step_size
    )
    batch.bucket = bucket
    generator._prompt_batch = batch  # noqa: SLF001  (made once in BatchGenerator.__init__, never replaced)
    return batch


def prompt_batch(generator: BatchGenerator) -> Any:
    """``generator``'s prompt batch (a ``BucketedPrompts`` once installed), for tests and tuning."""
    return generator._prompt_batch  # noqa: SLF001
