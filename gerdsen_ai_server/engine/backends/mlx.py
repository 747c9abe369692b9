"""MLX models through mlx-lm's ``BatchGenerator``: continuous batching on the engine thread.

The engine admits a request (``admit``: its prompt goes in behind the longest cached prefix of an
earlier one, prompt_cache.py) and steps the batch (``step``): mlx-lm prefills the new prompts and
samples one token for every active sequence; each token goes through the shared text step
(text.py) into its stream. A sequence whose stream was cancelled leaves at the next turn
(``cancel``). The batch's decode batch is mlxlm.py's ``DecodeBatch`` (no forward pass for a token
nobody reads) as speculative.py's ``SpeculativeBatch`` (prompt-lookup or draft-model drafts for
every speculating sequence, verified in one pass). Everything here runs on the engine thread: it is all MLX work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from gerdsen_ai_server.engine import prefill_buckets, quantized_cache
from gerdsen_ai_server.engine.backends.base import Capabilities, LoadedModel, Reports
from gerdsen_ai_server.engine.prompt_cache import PrefixCache
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.engine.sampling import build_logits_processors, build_sampler, guarded, token_logprob
from gerdsen_ai_server.engine.speculative import SpeculativeBatch
from gerdsen_ai_server.engine.text import TextStep

log = logging.getLogger(__name__)

# Prompts prefilled together in one pass at most (mlx-lm's prefill_batch_size), below the batch size.
MAX_PREFILL = 8


def prefill_size(batch_size: int) -> int:
    """Prompts prefilled together in one pass (mlx-lm's prefill_batch_size)."""
    return min(batch_size, MAX_PREFILL)


@dataclass
class _Sequence:
    stream: TokenStream
    text: TextStep
    errors: list[Exception]  # what its logits processors raised (sampling.guarded)


class MLXBackend(Reports):
    """A resident MLX model's batch: mlx-lm's BatchGenerator and the sequences it runs."""

    name = "mlx"
    capabilities = Capabilities(embeddings=True)

    def __init__(
        self, loaded: LoadedModel, prompt_cache: PrefixCache, max_batch: int, batch_size: int, prefill_bucket: int = 0
    ) -> None:
        self.loaded = loaded
        self._prompt_cache = prompt_cache
        self._max_batch = max_batch
        self._batch_size = batch_size  # max_batch, or the thermal cap below it (set_batch_limit)
        self._sequences: dict[int, _Sequence] = {}
        self._counts = (0, 0)
        self.decode_seconds = 0.0
        self.prefill_bucket = prefill_buckets.resolve(prefill_bucket)  # IMPETUS_PREFILL_BUCKET
        self._generator = self._new_generator()
        prompt_cache.attach(loaded, self)  # its live KV is the prompt cache's L1; its disk-tier key

    @property
    def nbytes(self) -> int:
        return self.loaded.nbytes

    @property
    def kv_bytes(self) -> int:
        """Bytes of the running batch's KV cache (the prompt cache's L1), read from any thread."""
        return sum(c.nbytes for c in self._generator._generation_batch.prompt_cache or [])  # noqa: SLF001

    @property
    def busy(self) -> bool:
        return bool(self._sequences)

    def counts(self) -> tuple[int, int]:
        return self._counts

    def _recount(self) -> None:
        """Kept as plain ints after every change, for readers on other threads (stats, /metrics)."""
        active = len(self._generator._generation_batch)  # noqa: SLF001
        self._counts = (active, len(self._sequences) - active)

    def _new_generator(self) -> BatchGenerator:
        loaded = self.loaded
        generator = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
            completion_batch_size=self._max_batch,
            prefill_batch_size=prefill_size(self._batch_size),
        )
        # Its decode batch is made once, here, and extended by every prefilled prompt after.
        generator._generation_batch = SpeculativeBatch.create(  # noqa: SLF001
            loaded.model, generator.sampler, self._request_of, lambda: self._bound.stats if self._bound else None
        )
        prefill_buckets.install(generator, self.prefill_bucket)  # prompts prefilled at bucketed lengths
        self._apply_batch_limit(generator)
        return generator

    def _request_of(self, uid: int) -> GenerationRequest | None:
        """A sequence's request, for its decode batch to read its speculative decoding (speculative.py)."""
        live = self._sequences.get(uid)
        return live.stream.request if live is not None else None

    def _apply_batch_limit(self, generator: BatchGenerator) -> None:
        # BatchGenerator admits a new sequence only while its generation batch is below
        # completion_batch_size, and prefills up to prefill_batch_size at once: cap both.
        generator.completion_batch_size = self._batch_size
        generator.prefill_batch_size = prefill_size(self._batch_size)

    def set_batch_limit(self, size: int) -> None:
        self._batch_size = size
        self._apply_batch_limit(self._generator)

    def admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        host = self._host
        vocab = len(self.loaded.tokenizer)
        bad = [t for t in (request.sampling.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            host.finish(stream, TokenEvent(error=f"logit_bias names tokens outside the vocabulary: {bad}"))
            return
        prompt = request.prompt_tokens
        errors: list[Exception] = []
        processors = build_logits_processors(request.sampling, request.max_tokens) + request.logits_processors
        self._prompt_cache.store(None)  # a request finds the cache of every request answered before it
        cache, rest = self._prompt_cache.lookup(request.model, prompt)
        bits = self.loaded.kv_bits
        if not quantized_cache.fits(cache, bits):  # never a cache of another kind in the batch
            cache, rest = None, prompt
        if cache is None and bits:  # mlx-lm would make plain KVCaches: a quantized batch needs its own
            cache = quantized_cache.new_caches(self.loaded.model, bits)
        try:
            (uid,) = self._generator.insert(
                [rest],
                max_tokens=[request.max_tokens],
                # None: mlx-lm makes a fresh cache (insert_segments); its hint says List[List[Any]]
                caches=[cache],  # type: ignore[list-item]
                all_tokens=[prompt[: len(prompt) - len(rest)]],
                samplers=[build_sampler(request.sampling)],
                logits_processors=[guarded(processors, errors, len(prompt))],
            )
        except Exception as exc:
            host.finish(stream, TokenEvent(error=f"Could not start generation: {exc}"))
            return
        host.touch()
        host.stats.prompt_tokens_total += len(request.prompt_tokens)
        self._sequences[uid] = _Sequence(stream=stream, text=TextStep(self.loaded.tokenizer, request), errors=errors)
        self._recount()

    def cancel(self) -> None:
        gone = [uid for uid, seq in self._sequences.items() if seq.stream.cancelled]
        if gone:
            self._generator.remove(gone)
            for uid in gone:
                self._host.finish(self._sequences.pop(uid).stream, None)
            self._host.stats.requests_cancelled_total += len(gone)
            self._recount()

    def step(self) -> None:
        host = self._host
        prefills = len(self._sequences) > len(self._generator._generation_batch)  # noqa: SLF001
        started = time.monotonic()
        try:
            _, responses = self._generator.next()
        except Exception as exc:
            # The batch's state is unknown after a failed step: fail its requests, start afresh.
            log.exception("generation step failed")
            for seq in self._sequences.values():
                host.finish(seq.stream, TokenEvent(error=f"Generation failed: {exc}"))
            self._sequences.clear()
            self._generator.close()
            self._generator = self._new_generator()
            # mlx-lm's compiled samplers thread MLX's global random state through the graph; a
            # step that raised inside one leaves that state unevaluable ("eval an array without a
            # primitive") for every later request: give it a fresh state.
            mx.random.seed(time.time_ns() % (1 << 32))
            self._recount()
            return
        if not prefills and self._generator._generation_batch.forwarded:  # noqa: SLF001
            self.decode_seconds = time.monotonic() - started
        host.stats.steps_total += 1
        host.stats.generated_tokens_total += len(responses)
        # Every event of the step goes out before the finished sequences' caches are stored: stored
        # one by one in between, the last answer of a wave reached its client ~30 ms after the first.
        finished: list[tuple[list[int], list[Any] | None]] = []
        for response in responses:
            live = self._sequences.get(response.uid)
            if live is not None and live.errors:
                self._generator.remove([response.uid])
                del self._sequences[response.uid]
                host.finish(live.stream, TokenEvent(error=f"Generation failed: {live.errors[0]}"))
                continue
            if live is None:  # a stop string ended it earlier in this step's run (speculative.py)
                continue
            self._emit(response.uid, live, response, finished)
            if response.finish_reason is not None:
                finished.append((response.all_tokens, response.prompt_cache))
        self._prompt_cache.keep(self.loaded.model_id, finished)
        self._recount()

    def _emit(
        self, uid: int, seq: _Sequence, response: Any, finished: list[tuple[list[int], list[Any] | None]]
    ) -> None:
        event = seq.text.event(
            response.token, response.finish_reason, lambda token, top: token_logprob(response.logprobs, token, top)
        )
        if event.stop_sequence:  # a stop string ended it: out of the batch, its cache kept
            for cache, tokens in self._generator.remove([uid], return_prompt_caches=True).values():
                finished.append((tokens, cache))
        if event.finish_reason is None:
            seq.stream.put(event)
        else:
            del self._sequences[uid]
            self._host.touch()  # keep-alive counts from the last answer
            self._host.finish(seq.stream, event)

    def abort(self, message: str) -> None:
        for seq in self._sequences.values():
            self._host.finish(seq.stream, TokenEvent(error=message))
        self._sequences.clear()
        self._counts = (0, 0)  # the engine stops: nothing decodes any more

    def close(self) -> None:
        self._generator.close()
