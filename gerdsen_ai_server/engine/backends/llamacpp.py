"""GGUF models through llama.cpp (``llama-cpp-python``'s low-level bindings), continuously batched.

Which backend loads a GGUF (``IMPETUS_BACKEND``, handed down as ``BackendOptions.backend``):
``auto`` sends a user's ``.gguf`` file (or a folder holding one) here when ``llama_cpp`` is
installed and converts it to MLX otherwise; the embedded default model stays on MLX in ``auto``
(it is converted once, as before). ``mlx`` converts every GGUF to MLX; ``llamacpp`` runs every
GGUF here, the embedded default model's included. MLX / safetensors folders always load on MLX.

One ``LlamaCppBackend`` per resident model: one llama.cpp context with a KV sequence per slot
(``IMPETUS_MAX_BATCH`` slots, each with the effective context length: Ollama's parallel slots;
docs/llamacpp.md says why not llama-server's ``--kv-unified``), its own thread, and the engine's
``Backend`` contract (base.py, ``threaded``): ``admit`` queues a request from the caller's thread
at once; the backend's thread puts waiting requests into free slots, puts every running
sequence's next token (and prompt chunks of new ones) into one ``llama_batch``, calls
``llama_decode`` once per step, and samples each sequence from its own logits in numpy with its
own random generator (llamacpp_sampling.py: nothing that runs beside a seeded request draws from
it); each token then goes through the text step both backends share (text.py). A finished
sequence's KV cells stay in its slot: a later prompt that starts with the same tokens takes that
slot and decodes only the rest (prompt-prefix reuse).

Reproducibility: a seeded request samples the same tokens again whatever runs beside it (its logits
within ~1e-5): no row of it runs in a one-token micro-batch (llamacpp_ubatch.py says why and the cost).

Tokens and text: the GGUF's vocabulary is rebuilt as a Hugging Face tokenizer (as the MLX
conversion does, formats/gguf_tokenizer.py) and loaded with mlx-lm's wrapper, so chat templates
(from the GGUF metadata), tool calls, grammars (llguidance) and logprobs work exactly as on MLX.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gerdsen_ai_server.engine.backends.base import Capabilities, Reports
from gerdsen_ai_server.engine.backends.llamacpp_runtime import init_once
from gerdsen_ai_server.engine.backends.llamacpp_sampling import Sampler, grammar_of, log_softmax, token_logprob
from gerdsen_ai_server.engine.backends.llamacpp_sizing import KV_TYPE_NAMES, KV_TYPES
from gerdsen_ai_server.engine.backends.llamacpp_slots import choose_slot, common_prefix
from gerdsen_ai_server.engine.backends.llamacpp_ubatch import refeeds, seeded
from gerdsen_ai_server.engine.backends.llamacpp_vision import Projector, image_start, text_before_image
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.engine.text import TextStep
from gerdsen_ai_server.store.errors import ModelLoadError

log = logging.getLogger(__name__)

# Tokens put into one llama_decode call at most (decoding tokens first, then prompt chunks).
BATCH_TOKENS = 512
STOPPED = "the llama.cpp engine stopped"


@dataclass
class _Seq:
    stream: TokenStream
    request: GenerationRequest
    sampler: Sampler
    text: TextStep
    pending: list[int]  # tokens to feed next (prompt rest, then the last sampled token)
    media: dict[int, Any] = field(default_factory=dict)  # prompt index -> its image chunk (llamacpp_vision.py)


@dataclass
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cells hold
    seq: _Seq | None = None
    used: int = 0  # when a request last took it (the backend's count of assignments): the LRU order


class LlamaCppBackend(Reports):
    """A resident GGUF model: llama.cpp's context, its slots and the thread that steps them."""

    name = "llamacpp"
    # Grammars only (their llguidance matcher, driven in numpy), no other logits processor; no embeddings.
    capabilities = Capabilities(threaded=True, logits_processors=False)
    decode_seconds = 0.0  # its own thread decodes: the engine's admission never waits on its steps
    slot_files: Any = None  # llamacpp_state.SlotFiles: the prompt cache's disk tier (prompt_cache.py)

    def __init__(
        self,
        path: Path,
        tokenizer: Any,
        n_seq: int,
        slot_ctx: int,
        n_threads: int | None = None,
        kv_cache_bytes: int = 0,
        kv_bits: int = 0,
        mmproj: Path | None = None,
    ) -> None:
        import llama_cpp as lc

        init_once(lc)
        self._lc = lc
        self.path = path
        self.tokenizer = tokenizer
        self.n_seq = n_seq
        self.slot_ctx = slot_ctx
        threads = n_threads or os.cpu_count() or 1
        mparams = lc.llama_model_default_params()
        mparams.use_mmap = True
        self._model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = slot_ctx * n_seq
        cparams.n_batch = BATCH_TOKENS
        cparams.n_ubatch = BATCH_TOKENS
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False  # each sequence its own slot_ctx cells: one can never starve another
        cparams.no_perf = True
        # A quantized cache (llama-server's -ctk/-ctv q8_0|q4_0) needs flash attention for V: asked
        # for explicitly (llama.cpp's own 'auto' also enables it on CPU, f16 included, so 0 bits
        # differs from 8 and 4 by the cache's type alone).
        self.kv_bits = kv_bits
        cparams.type_k = cparams.type_v = KV_TYPES[kv_bits][0]
        if kv_bits:
            cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path} ({n_seq} x {slot_ctx} tokens, "
                f"{KV_TYPE_NAMES[kv_bits]} KV cache)"
            )
        self._mem = lc.llama_get_memory(self._ctx)
        self.vision = Projector(lc, self._model, mmproj, threads) if mmproj else None  # a vision model's projector
        if self.vision:
            self.capabilities = replace(self.capabilities, vision=True)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.nbytes = int(lc.llama_model_size(self._model)) + kv_cache_bytes
        self.nbytes += self.vision.nbytes if self.vision else 0
        self._batch = lc.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._slots = [_Slot(i) for i in range(n_seq)]
        self._waiting: list[_Seq] = []
        self._inbox: queue.Queue[tuple[GenerationRequest, TokenStream]] = queue.Queue()
        self._wake = threading.Event()
        self._closed = False  # the thread stops (set by close(), or by the thread itself on a crash)
        self._freed = False  # context and model freed (close())
        self.prefix_tokens_reused = 0
        self._assigned = 0  # requests put into slots so far (each slot's ``used``)
        self._batch_limit = 0  # set_batch_limit: the thermal cap; 0: no cap, all slots
        self._abort: str | None = None  # abort(): fail everything held, on the backend's thread
        self._thread = threading.Thread(target=self._run, name=f"impetus-llamacpp-{path.stem}", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------
    def admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        """Queue ``request`` for the backend's thread, which puts it into a free slot."""
        if self._closed or not self._thread.is_alive():  # never leave a caller waiting on a dead thread
            self._host.finish(stream, TokenEvent(error=STOPPED))
            return
        self._inbox.put((request, stream))
        self._wake.set()

    @property
    def busy(self) -> bool:
        return not self._inbox.empty() or bool(self._waiting) or any(s.seq for s in self._slots)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) for /metrics and the dashboard."""
        return sum(1 for s in self._slots if s.seq), len(self._waiting) + self._inbox.qsize()

    def set_batch_limit(self, size: int) -> None:
        self._batch_limit = size

    def prompt_ids(self, text: str, images: list[ImageInput]) -> list[int]:
        """The rendered prompt with its images tokenized by the projector (the caller's thread)."""
        if self.vision is None:
            raise ValueError("this model has no multimodal projector")
        return self.vision.prompt_ids(text, images)

    def abort(self, message: str) -> None:
        """Fail every request held, at the thread's next turn (it owns the slots)."""
        self._abort = message
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (failing what is left) and free the context and the model."""
        if self._freed:
            return
        self._closed = self._freed = True
        self._wake.set()
        self._thread.join(timeout=30)
        lc = self._lc
        lc.llama_batch_free(self._batch)
        if self.vision:
            self.vision.close()
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    # ---- the backend's thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed:
                if self._abort is not None:
                    self._fail_all(self._abort)
                    self._abort = None
                self._take_new()
                self.cancel()
                self._assign()
                if any(s.seq for s in self._slots):
                    self.step()
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException:
            log.exception("llama.cpp engine thread crashed")
            self._closed = True
        finally:
            self._fail_all(STOPPED)

    def _fail_all(self, message: str) -> None:
        held = [s.seq for s in self._slots if s.seq] + self._waiting
        self._waiting = []
        for slot in self._slots:
            slot.seq = None
        for seq in held:
            self._end(seq, TokenEvent(error=message))
        while not self._inbox.empty():
            _, stream = self._inbox.get_nowait()
            self._host.finish(stream, TokenEvent(error=message))

    def _take_new(self) -> None:
        while True:
            try:
                request, stream = self._inbox.get_nowait()
            except queue.Empty:
                return
            host = self._host
            try:
                bad = [t for t in (request.sampling.logit_bias or {}) if not 0 <= t < self.n_vocab]
                if bad:
                    raise ValueError(f"logit_bias names tokens outside the vocabulary: {bad}")
                sampler = Sampler(request.sampling, grammar_of(request))
                cells, media = self._cells(request) if request.images else ([], {})
            except Exception as exc:
                host.finish(stream, TokenEvent(error=str(exc)))
                continue
            host.stats.prompt_tokens_total += len(request.prompt_tokens)
            host.touch()
            text = TextStep(self.tokenizer, request)
            self._waiting.append(_Seq(stream, request, sampler, text, cells or list(request.prompt_tokens), media))

    def _cells(self, request: GenerationRequest) -> tuple[list[int], dict[int, Any]]:
        if self.vision is None:
            raise ValueError("this model cannot take images")
        return self.vision.cells(request.prompt_tokens, request.images)  # llamacpp_vision.py

    def cancel(self) -> None:
        """Drop the sequences whose client left, waiting or running (the backend's thread)."""
        for seq in [q for q in self._waiting if q.stream.cancelled]:
            self._waiting.remove(seq)
            self._end(seq, None)
        for slot in self._slots:
            if slot.seq is not None and slot.seq.stream.cancelled:
                seq, slot.seq = slot.seq, None
                self._end(seq, None)

    def _assign(self) -> None:
        """Waiting requests into free slots: the one whose cached prefix it can use, else one beside the running
        slots, empty before one holding a history (llamacpp_slots.py)."""
        cap = min(self.n_seq, self._batch_limit or self.n_seq)
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free or self.n_seq - len(free) >= cap:
                return
            seq = self._waiting[0]  # taken off the queue once in its slot: a failure here leaves it to _fail_all
            prompt = seq.pending
            busy = [s.seq_id for s in self._slots if s.seq is not None]
            tokens, used = {s.seq_id: s.tokens for s in free}, {s.seq_id: s.used for s in free}
            slot = self._slots[choose_slot(prompt, tokens, busy, used)]
            self._assigned += 1
            slot.used = self._assigned
            if self.slot_files is not None:  # a file that shares more of the prompt: loaded into the slot
                slot.tokens = self.slot_files.restore(slot.seq_id, prompt, slot.tokens)
            # Feed at least the prompt's last two tokens: llama.cpp's CPU products for a one-token
            # chunk differ from a longer chunk's in the last bits (logits ~3e-3 apart on the default
            # model), and a repeated seeded request then sampled another answer than the first.
            keep = image_start(prompt, max(0, min(common_prefix(slot.tokens, prompt), len(prompt) - 2)))
            if not self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                keep = 0
                self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            if keep:
                self._host.stats.prompt_cache_hits_total += 1
                self.prefix_tokens_reused += keep
            else:
                self._host.stats.prompt_cache_misses_total += 1
            slot.tokens = prompt[:keep]
            seq.pending = prompt[keep:]
            slot.seq = self._waiting.pop(0)

    def step(self) -> None:
        """One ``llama_decode``: every running sequence's next token, then prompt chunks in the room left."""
        lc, batch = self._lc, self._batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []
        fed: list[tuple[_Slot, _Seq, int]] = []
        # Running sequences' next tokens first (one each), then prompt chunks in the room left.
        order = sorted((s for s in self._slots if s.seq), key=lambda s: len(s.seq.pending) > 1)  # type: ignore[union-attr]
        for slot in order:
            seq = slot.seq
            if seq is None:
                raise RuntimeError("an active slot without a sequence")
            if seq.media and self.vision and (error := self.vision.feed(self._ctx, slot, seq, BATCH_TOKENS)):
                slot.seq, slot.tokens = None, []  # its image first, on its own (llamacpp_vision.py): it failed
                lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                self._end(seq, TokenEvent(error=f"Generation failed: {error}"))
                continue
            room = BATCH_TOKENS - len(order) - n  # one re-fed token each at most (below)
            take = min(text_before_image(seq.pending) if seq.media else len(seq.pending), room)
            if take == len(seq.pending) - 1 > 0:  # nor does a long prompt's last token go alone (_assign)
                take -= 1
            if take > 0:
                fed.append((slot, seq, take))
                n += take
        # A seeded sequence never in a one-token ubatch (other kernels): its last token again (llamacpp_ubatch.py).
        able = {slot.seq_id for slot, seq, _ in fed if slot.tokens and seeded(seq.request)}
        again = refeeds([(slot.seq_id, take) for slot, _, take in fed], able, BATCH_TOKENS)
        n = 0
        for slot, seq, take in fed:
            back = int(slot.seq_id in again)
            if back:
                lc.llama_memory_seq_rm(self._mem, slot.seq_id, len(slot.tokens) - 1, -1)
            start = len(slot.tokens) - back
            for j, token in enumerate(slot.tokens[start:] + seq.pending[:take]):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, start + j, 1, 0
                batch.seq_id[n][0] = slot.seq_id
                n += 1
            if take == len(seq.pending):
                batch.logits[n - 1] = 1
                outputs.append((slot, n - 1))
        batch.n_tokens = n
        if not n:  # only images this step
            return
        rc = lc.llama_decode(self._ctx, batch)
        self._host.stats.steps_total += 1
        if rc != 0:
            log.error("llama_decode returned %d", rc)
            for slot, seq, _ in fed:
                slot.seq, slot.tokens = None, []
                lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                self._end(seq, TokenEvent(error=f"Generation failed: llama_decode returned {rc}"))
            return
        for slot, seq, take in fed:
            slot.tokens.extend(seq.pending[:take])
            del seq.pending[:take]
        for slot, index in outputs:
            self._sample(slot, np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,)))

    def _sample(self, slot: _Slot, raw: np.ndarray) -> None:
        seq = slot.seq
        if seq is None:
            raise RuntimeError("sampling a slot without a sequence")
        try:
            logits = seq.sampler.process(raw)
            logprobs = log_softmax(logits)
            token = seq.sampler.sample(logprobs)
            seq.sampler.accept(token)
        except Exception as exc:  # one request's bad grammar never fails the others
            slot.seq = None
            self._end(seq, TokenEvent(error=f"Generation failed: {exc}"))
            return
        self._host.stats.generated_tokens_total += 1
        text = seq.text
        finish = None
        if token in text.eos_ids:
            finish = "stop"
        elif text.completion_tokens + 1 >= seq.request.max_tokens:
            finish = "length"
        event = text.event(token, finish, lambda chosen, top: token_logprob(logprobs, chosen, top))
        if event.finish_reason is None:
            seq.pending = [token]
            seq.stream.put(event)
        else:
            slot.seq = None
            self._end(seq, event)
            if self.slot_files is not None and not seq.request.images:  # after its answer: its cells to disk
                self.slot_files.save(slot.seq_id, slot.tokens)

    def _end(self, seq: _Seq, event: TokenEvent | None) -> None:
        if seq.media and self.vision:
            self.vision.free(seq.media)
        host = self._host
        if event is None:
            host.stats.requests_cancelled_total += 1
        else:
            host.touch()  # keep-alive counts from the last answer
        host.finish(seq.stream, event)
