"""The inference engine: one OS thread that owns every MLX call.

HTTP threads call ``submit(request) -> TokenStream`` and read their stream; the engine thread
loads models, admits requests into mlx-lm's ``BatchGenerator`` (continuous batching), samples
one token per active sequence per step, detokenizes, applies stop strings, and drops a
sequence whose client has gone. Why one thread: MLX aborted the process at exit when several
threads drove one model, and every new thread touching MLX leaked OS threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from gerdsen_ai_server.engine.embeddings import EmbeddingCancelled, EmbeddingJob
from gerdsen_ai_server.engine.formats.loaders import LoadedModel, LoaderFactory
from gerdsen_ai_server.engine.mlxlm import DecodeBatch, PromptCache
from gerdsen_ai_server.engine.protocol import EngineGone, GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.engine.registry import ModelRegistry, Resident
from gerdsen_ai_server.engine.sampling import (
    StopMatcher,
    build_logits_processors,
    build_sampler,
    guarded,
    token_logprob,
)
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)


# Seconds a load in progress may use per engine-loop turn while models decode (at least, at most).
LOAD_SLICE_S = (0.02, 0.25)
# Embeddings go in slices of tokens sized to the time they may take (LOAD_SLICE_S, as loads): the
# first slice measures the model's speed, later ones follow it, within these bounds.
EMBED_SLICE_TOKENS = (16, 4096)
EMBED_FIRST_SLICE_TOKENS = 32
# A received request waits for the rest of its burst while requests keep coming at most one decode
# step apart (at least ADMIT_QUIET_S; never beyond the admission window, IMPETUS_ADMIT_WINDOW_MS).
ADMIT_QUIET_S = 0.002
ADMIT_POLL_S = 0.001  # how often an idle engine holding requests looks for the rest of the burst


class EngineOverloaded(RuntimeError):
    """More requests in flight than the engine accepts; the caller should retry later."""


class ContextLengthExceeded(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens."
        )


@dataclass
class _Sequence:
    stream: TokenStream
    detokenizer: Any
    stop: StopMatcher
    eos_ids: set[int]
    prompt_tokens: int
    errors: list[Exception]
    logprobs: int | None = None
    completion_tokens: int = 0


@dataclass
class EngineStats:
    """Counters read by /health, /metrics and the dashboard feed (plain ints: safe to read anywhere)."""

    requests_in_flight: int = 0
    active_sequences: int = 0
    queued_sequences: int = 0
    max_batch: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    requests_finished_total: int = 0
    requests_failed_total: int = 0
    requests_cancelled_total: int = 0
    prompt_cache_hits_total: int = 0
    prompt_cache_misses_total: int = 0
    prompt_cache_bytes: int = 0
    steps_total: int = 0


def make_detokenizer(tokenizer: Any, strip_leading_space: bool) -> Any:
    detokenizer = tokenizer.detokenizer
    if not strip_leading_space and hasattr(detokenizer, "_maybe_trim_space"):
        # The BPE detokenizer trims only while its text is empty: start it with a sentinel
        # character that ``last_segment`` (which reads from ``offset``) never returns.
        detokenizer.text, detokenizer.offset = "\x00", 1
    elif not strip_leading_space and hasattr(detokenizer, "trim_space"):
        detokenizer.trim_space = False  # SentencePiece models
    return detokenizer


def default_compute_dtype(setting: str) -> str | None:
    """'auto' is float32 on CPU, where a real BLAS makes fp32 the fast path; as stored elsewhere."""
    if setting != "auto":
        return setting
    return "float32" if mx.default_device() == mx.cpu else None


class InferenceEngine:
    def __init__(
        self,
        models_dir: Path,
        max_batch: int = 8,
        max_queue: int = 32,
        compute_dtype: str = "auto",
        prompt_cache_bytes: int = 1 << 30,
        memory_budget: int = 8 << 30,
        keep_alive: float = 300.0,
        loader: LoaderFactory | None = None,
        events: EventBus | None = None,
        on_crash: Callable[[], None] | None = None,
        crash_after_steps: int = 0,
        mlx_cache_limit: int | None = None,
        admit_window: float = 0.0,
    ) -> None:
        self.models_dir = models_dir
        # Seconds an idle engine may wait for the rest of a burst of requests before prefilling.
        self.admit_window = admit_window
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.compute_dtype = default_compute_dtype(compute_dtype)
        self.events = events or EventBus()
        self.registry = ModelRegistry(
            loader=loader or LoaderFactory(),
            models_dir=models_dir,
            compute_dtype=self.compute_dtype,
            budget_bytes=memory_budget,
            keep_alive=keep_alive,
            make_generator=self._new_generator,
            events=self.events,
            on_unload=self._forget,
        )
        self._commands: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self._inflight = 0
        # Requests received but held back from the batch for the rest of their burst (_admit_held).
        self._held: list[tuple[GenerationRequest, TokenStream]] = []
        self._held_since = 0.0  # when the oldest held request was received
        self._last_received = 0.0
        self._decode_seconds = 0.0  # how long the last step that only decoded (with a forward pass) took
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._running = threading.Event()
        self._stats = EngineStats(max_batch=max_batch)
        # KV caches of finished sequences, keyed by model and token prefix (mlx-lm's own LRU trie).
        self._prompt_cache = PromptCache(max_size=1 << 20, max_bytes=prompt_cache_bytes)
        self.prompt_cache_enabled = prompt_cache_bytes > 0
        # Finished sequences' KV caches still to store there (model id, tokens, cache): see _store.
        self._unstored: list[tuple[str, list[int], list[Any]]] = []
        # Called if the engine thread dies: the app makes the worker exit so Gunicorn replaces it
        # rather than leaving a process that can only answer errors.
        self._on_crash = on_crash
        self._crash_after_steps = crash_after_steps  # fault injection for the reliability tests
        self._mlx_cache_limit = mlx_cache_limit
        # A cap below max_batch while the machine runs hot (monitor.ThermalGovernor); None: no cap.
        self.batch_limit: int | None = None
        self._loads_turn_ended = 0.0  # when _advance_loads last gave the thread back
        # Embedding jobs in arrival order, advanced a slice at a time (_advance_embeddings).
        self._embeddings: list[EmbeddingJob] = []
        self._embeds_turn_ended = 0.0
        self._embed_seconds_per_token: dict[str, float] = {}  # per model, measured by its last slices
        self._thread = threading.Thread(target=self._run, name="impetus-engine", daemon=True)
        self.started_at = time.time()

    # ---- wiring -------------------------------------------------------------------------
    def init_app(self, app: Any) -> None:
        app.extensions["impetus"] = self

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is in flight and stop stepping; returns once the loop has left."""
        self._stopping.set()
        self._commands.put(("wake", None, None))
        deadline = time.monotonic() + timeout
        while self._running.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    def is_alive(self) -> bool:
        return self._running.is_set() and not self._stopping.is_set()

    # ---- caller side (any thread) ------------------------------------------------------
    def load_model(self, spec: str, keep_alive: float | None = None, pinned: bool = False, *,
                   trusted: bool = False, allowed: Sequence[Path] = ()) -> Future[LoadedModel]:
        """Load on the engine thread (``keep_alive``: idle seconds, None for the server default, inf to keep).

        ``spec`` is untrusted unless ``trusted`` (only the operator's own, never a request's): it then
        resolves inside the models dir or under ``allowed`` (IMPETUS_MODEL_PATHS) only (registry.begin_load).
        """
        future: Future[LoadedModel] = Future()
        self._commands.put(("load", (spec, keep_alive, pinned, trusted, tuple(allowed)), future))
        return future

    def unload_model(self, model_id: str) -> Future[None]:
        future: Future[None] = Future()
        self._commands.put(("unload", model_id, future))
        return future

    def embed(self, model_id: str, inputs: list[list[int]]) -> EmbeddingJob:
        """Pooled, normalised hidden states of each input, computed on the engine thread in slices
        between decode steps; ``job.future`` has them. Counts against the same capacity as a
        generation (EngineOverloaded beyond it) until it ends or the caller cancels the job."""
        self.get_model(model_id)
        self._reserve()
        job = EmbeddingJob(model_id, inputs)
        self._commands.put(("embed", job, None))
        return job

    def models(self) -> list[LoadedModel]:
        return [r.loaded for r in list(self.registry.residents.values())]

    def residents(self) -> list[Resident]:
        return list(self.registry.residents.values())

    def get_model(self, model_id: str) -> LoadedModel:
        resident = self.registry.get(model_id)
        if resident is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist or is not loaded.")
        return resident.loaded

    @property
    def inflight(self) -> int:
        return self._inflight

    def stats(self) -> EngineStats:
        """A snapshot; the engine thread keeps the live counters current after every step."""
        snapshot = EngineStats(**vars(self._stats))
        snapshot.requests_in_flight = self._inflight
        snapshot.prompt_cache_bytes = self._prompt_cache.nbytes
        for resident in list(self.registry.residents.values()):  # llama.cpp models count their own
            if hasattr(resident.generator, "sequence_counts"):
                running, waiting = resident.generator.sequence_counts()
                snapshot.active_sequences += running
                snapshot.queued_sequences += waiting
        return snapshot

    def set_batch_limit(self, limit: int | None) -> None:
        """Decode at most ``limit`` sequences per step (None: ``max_batch``), from the next loop turn.
        Running sequences finish; new ones wait until the batch is below the cap."""
        self._commands.put(("batch_limit", limit, None))

    def submit(self, request: GenerationRequest) -> TokenStream:
        loaded = self.get_model(request.model)
        prompt_len = len(request.prompt_tokens)
        if prompt_len + request.max_tokens > loaded.context_length:
            raise ContextLengthExceeded(prompt_len, request.max_tokens, loaded.context_length)
        self._reserve()
        stream = TokenStream(request, self.is_alive)
        resident = self.registry.get(request.model)
        if resident is not None and hasattr(resident.generator, "submit"):  # llama.cpp: its own thread
            resident.generator.submit(request, stream, self._stats, self._finish)
            return stream
        self._commands.put(("generate", request, stream))
        return stream

    def _reserve(self) -> None:
        """Take one of the IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE places, or refuse (503 upstream)."""
        if not self.is_alive():
            raise EngineOverloaded("The inference engine is not running.")
        with self._lock:
            if self._inflight >= self.max_queue + self.max_batch:
                raise EngineOverloaded(
                    f"The server is at capacity ({self._inflight} requests in flight); retry shortly."
                )
            self._inflight += 1

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1

    # ---- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self._mlx_cache_limit is not None:
            # MLX keeps freed buffers for reuse, by default up to its whole memory limit: bound it
            # so a long-running server's RSS settles instead of creeping up.
            mx.set_cache_limit(self._mlx_cache_limit)
        self._running.set()
        try:
            while not self._stopping.is_set():
                busy = (any(r.sequences for r in self.registry.residents.values()) or bool(self.registry.loading)
                        or bool(self._embeddings))
                self._drain_commands(None if busy or self._unstored else ADMIT_POLL_S if self._held else 0.5)
                self._admit_held()
                self._drop_cancelled()
                self.registry.expire_idle()
                self._store(None if any(r.sequences for r in self.registry.residents.values()) else 1)
                for resident in list(self.registry.residents.values()):
                    if resident.sequences:
                        self._step(resident)
                self._advance_loads()
                self._advance_embeddings()
                if self._crash_after_steps and self._stats.steps_total >= self._crash_after_steps:
                    raise RuntimeError(f"injected fault: engine crash after {self._crash_after_steps} steps")
                self._stats.active_sequences = sum(
                    len(r.generator._generation_batch) for r in self.registry.residents.values()  # noqa: SLF001
                )
                self._stats.queued_sequences = sum(len(r.sequences) for r in self.registry.residents.values()) - (
                    self._stats.active_sequences
                ) + len(self._held)
        except BaseException:  # the thread must never die silently: readiness reports it
            log.exception("engine thread crashed")
            crashed = True
        else:
            crashed = False
        finally:
            self._fail_all("the inference engine stopped")
            self._running.clear()
            if crashed and self._on_crash is not None:
                self._on_crash()
            # Park instead of returning: when a thread that ran MLX exits, its thread-local
            # MLX state is destroyed and the process aborts ("terminate called without an
            # active exception"). A parked daemon thread simply ends with the process.
            threading.Event().wait()

    def _drain_commands(self, timeout: float | None) -> None:
        """Handle every queued command; wait up to ``timeout`` seconds for the first (None: don't wait)."""
        try:
            command = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _admit_held(self) -> None:
        """Start the held requests, unless more of their burst may still come and there is room for it.

        Requests sent together arrive a few milliseconds apart, and admitted as they came they
        were prefilled in several passes, each a stall of every running stream. Worse, clients
        whose answers end together (closed-loop clients, an agent's parallel calls) come back
        together, and when their wave had been split their streams ended at different steps, so
        the next wave split again. So a received request waits while others keep arriving at most
        one decode step apart (the time one more token would take), within the admission window;
        running streams keep decoding meanwhile. Measured at 8 closed-loop streams on 2 CPU
        cores: every wave prefilled in one pass instead of 2-4 (docs/performance.md).
        """
        if not self._held:
            return
        now = time.monotonic()
        quiet = max(ADMIT_QUIET_S, self._decode_seconds)
        room = min(self._free_slots(), self._prefill_size)
        if len(self._held) < room and now - self._held_since < self.admit_window and now - self._last_received < quiet:
            return
        held, self._held = self._held, []
        for request, stream in held:
            self._admit(request, stream)

    @property
    def _batch_size(self) -> int:
        """Sequences decoded together per step: max_batch, or the thermal cap below it."""
        return min(self.max_batch, self.batch_limit or self.max_batch)

    @property
    def _prefill_size(self) -> int:
        """Prompts prefilled together in one pass (mlx-lm's prefill_batch_size)."""
        return min(self._batch_size, 8)

    def _free_slots(self) -> int:
        """Sequences the batch can still take before admissions have to queue anyway."""
        return self._batch_size - sum(len(r.sequences) for r in self.registry.residents.values())

    def _handle(self, kind: str, payload: Any, reply: Any) -> None:
        if kind == "load":
            self._load(payload, reply)
        elif kind == "unload":
            try:
                self.registry.unload(payload)
                reply.set_result(None)
            except ModelLoadError as exc:
                reply.set_exception(exc)
        elif kind == "generate":
            now = time.monotonic()
            if not self._held:
                self._held_since = now
            self._held.append((payload, reply))
            self._last_received = now
        elif kind == "batch_limit":
            self.batch_limit = payload
            for resident in self.registry.residents.values():
                self._apply_batch_limit(resident.generator)
        elif kind == "embed":
            self._embeddings.append(payload)

    def _load(self, payload: tuple[str, float | None, bool, bool, tuple[Path, ...]],
              future: Future[LoadedModel]) -> None:
        spec, keep_alive, pinned, trusted, allowed = payload
        try:
            found = self.registry.begin_load(spec, keep_alive=keep_alive, pinned=pinned, trusted=trusted,
                                             allowed=allowed)
        except ModelLoadError as exc:
            future.set_exception(exc)
            return
        except Exception as exc:  # a broken model file must never take the engine down
            log.exception("loading %s failed", spec)
            future.set_exception(ModelLoadError(f"Could not load '{spec}': {exc}"))
            return
        if isinstance(found, Resident):
            future.set_result(found.loaded)
        else:
            found.waiters.append(future)  # answered by _advance_loads when the load ends

    def _advance_loads(self) -> None:
        """Loads in progress, in steps of about LOAD_CHUNK_BYTES of weights, between decoding rounds.

        While models decode, loading gets as much time per turn as the last decoding round took
        (within LOAD_SLICE_S): streams keep going at about half speed instead of pausing for the
        whole load, and the load takes about twice as long. Idle, it runs in LOAD_SLICE_S[1] turns.
        """
        now = time.monotonic()
        if not self.registry.loading:
            self._loads_turn_ended = now
            return
        low, high = LOAD_SLICE_S
        decoding = any(r.sequences for r in self.registry.residents.values())
        deadline = now + (min(max(now - self._loads_turn_ended, low), high) if decoding else high)
        while self.registry.loading and time.monotonic() < deadline:
            for pending in list(self.registry.loading.values()):
                try:
                    resident = self.registry.advance(pending)
                except ModelLoadError as exc:  # advance wraps anything else in one
                    for future in pending.waiters:
                        future.set_exception(exc)
                    continue
                if resident is not None:
                    for future in pending.waiters:
                        future.set_result(resident.loaded)
        self._loads_turn_ended = time.monotonic()

    def _advance_embeddings(self) -> None:
        """Embedding jobs, oldest first, in slices of tokens between decoding rounds, as loads go.

        While models decode, embeddings get as much time per turn as the last decoding round took
        (within LOAD_SLICE_S): streams keep going at about half speed instead of pausing for the
        whole request, and a short chat is prefilled at the next turn instead of after the last
        input (while requests are held for admission, a turn is one short slice). Each slice is
        sized from the speed the previous one measured. A job whose caller cancelled it is dropped
        before its next slice. Measured: a 2-token chat beside a 3000-token embedding of the default
        model answered in 1.2 s (0.4 s alone, 2 shared CPU cores); computed whole, the embedding held it over 60 s.
        """
        now = time.monotonic()
        if not self._embeddings:
            self._embeds_turn_ended = now
            return
        low, high = LOAD_SLICE_S
        decoding = any(r.sequences for r in self.registry.residents.values())
        if self._held:  # requests wait for their prefill: one short slice, then admit them
            deadline = now + low
        else:
            deadline = now + (min(max(now - self._embeds_turn_ended, low), high) if decoding else high)
        while self._embeddings:
            job = self._embeddings[0]
            resident = self.registry.get(job.model_id)
            if job.cancelled or resident is None:
                self._end_embedding(job, EmbeddingCancelled("cancelled") if job.cancelled else
                                    ModelNotFound(f"The model '{job.model_id}' is not loaded."))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            per_token = self._embed_seconds_per_token.get(job.model_id)
            low_tokens, high_tokens = EMBED_SLICE_TOKENS
            tokens = EMBED_FIRST_SLICE_TOKENS if per_token is None else int(
                min(max(left / max(per_token, 1e-7), low_tokens), high_tokens))
            before, started = job.tokens_done, time.monotonic()
            try:
                finished = job.advance(resident.loaded.model, tokens)
            except Exception as exc:  # a bad input fails its request, never the engine
                log.exception("embedding failed")
                self._end_embedding(job, exc)
                continue
            done = job.tokens_done - before
            if done > 0:
                measured = (time.monotonic() - started) / done
                per_token = self._embed_seconds_per_token.get(job.model_id)
                self._embed_seconds_per_token[job.model_id] = (
                    measured if per_token is None else (per_token + measured) / 2)
            self.registry.touch(resident)
            if finished:
                self._end_embedding(job, None)
        self._embeds_turn_ended = time.monotonic()

    def _end_embedding(self, job: EmbeddingJob, error: BaseException | None) -> None:
        self._embeddings.remove(job)
        if isinstance(error, EmbeddingCancelled):
            self._stats.requests_cancelled_total += 1
        elif error is not None:
            self._stats.requests_failed_total += 1
        else:
            self._stats.requests_finished_total += 1
        self._release()
        if not job.future.done():
            if error is None:
                job.future.set_result(job.vectors)
            else:
                job.future.set_exception(error)

    def _new_generator(self, loaded: LoadedModel) -> BatchGenerator:
        if getattr(loaded, "kind", None) == "llamacpp":
            # A LlamaCppEngine: batches on its own thread, within the same (thermal) batch cap.
            return self._apply_batch_limit(loaded.model)  # type: ignore[no-any-return]
        generator = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
            completion_batch_size=self.max_batch,
            prefill_batch_size=self._prefill_size,
        )
        # Its decode batch is made once, here, and extended by every prefilled prompt after.
        generator._generation_batch = DecodeBatch.empty(loaded.model, generator.sampler)  # noqa: SLF001
        return self._apply_batch_limit(generator)

    def _apply_batch_limit(self, generator: BatchGenerator) -> BatchGenerator:
        # BatchGenerator admits a new sequence only while its generation batch is below
        # completion_batch_size, and prefills up to prefill_batch_size at once: cap both.
        size = self._batch_size
        generator.completion_batch_size = size
        generator.prefill_batch_size = self._prefill_size
        return generator

    def _admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        if stream.cancelled:  # the client left while its request waited
            self._finish(stream, None)
            self._stats.requests_cancelled_total += 1
            return
        resident = self.registry.get(request.model)
        if resident is None:
            self._finish(stream, TokenEvent(error=f"The model '{request.model}' is not loaded."))
            return
        vocab = len(resident.loaded.tokenizer)
        bad = [t for t in (request.sampling.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            self._finish(stream, TokenEvent(error=f"logit_bias names tokens outside the vocabulary: {bad}"))
            return
        prompt = request.prompt_tokens
        errors: list[Exception] = []
        processors = build_logits_processors(request.sampling, request.max_tokens) + request.logits_processors
        self._store(None)  # a request finds the cache of every request answered before it
        cache, rest = self._cached_prefix(request.model, prompt)
        try:
            (uid,) = resident.generator.insert(
                [rest],
                max_tokens=[request.max_tokens],
                caches=[cache],
                all_tokens=[prompt[: len(prompt) - len(rest)]],
                samplers=[build_sampler(request.sampling)],
                logits_processors=[guarded(processors, errors, len(prompt))],
            )
        except Exception as exc:
            self._finish(stream, TokenEvent(error=f"Could not start generation: {exc}"))
            return
        self.registry.touch(resident)
        self._stats.prompt_tokens_total += len(request.prompt_tokens)
        tokenizer = resident.loaded.tokenizer
        resident.sequences[uid] = _Sequence(
            stream=stream,
            detokenizer=make_detokenizer(tokenizer, request.strip_leading_space),
            stop=StopMatcher(request.stop),
            eos_ids=set(tokenizer.eos_token_ids),
            prompt_tokens=len(request.prompt_tokens),
            errors=errors,
            logprobs=request.logprobs,
        )

    def _cached_prefix(self, model_id: str, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """The KV cache of the longest cached prefix of ``prompt`` and the tokens still to process."""
        if not self.prompt_cache_enabled:
            return None, prompt
        cache, rest = self._prompt_cache.fetch_nearest_cache(model_id, prompt)
        if cache is not None and not rest:
            # The whole prompt is cached: step back one token so there is something to feed.
            if not can_trim_prompt_cache(cache):
                cache, rest = None, prompt
            else:
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
        if cache is None:
            self._stats.prompt_cache_misses_total += 1
            return None, prompt
        self._stats.prompt_cache_hits_total += 1
        return cache, rest

    def _store(self, count: int | None) -> None:
        """Store ``count`` (None: all) of the finished sequences' KV caches in the prompt cache.

        An extracted cache is a lazy copy out of the whole batch's KV buffers: evaluated, or the LRU
        would keep every batch buffer it was cut from alive (measured: +50 MB a request). The copies
        take MLX time (~10 ms for 8 sequences of ~100 tokens of the bench model on 2 CPU cores,
        25-40 ms while the HTTP threads answer), so they never delay the step's events (_step), and
        while nothing decodes they go one sequence per engine-loop turn, so that requests arriving
        meanwhile are received and held (_admit_held) instead of waiting on MLX. All that is left
        goes in one evaluation before a step or an admission: a request finds the cache of every
        request answered before it.
        """
        stored = self._unstored[:count]
        if not stored:
            return
        mx.eval([c.state for _, _, cache in stored for c in cache])
        for model_id, tokens, cache in stored:
            self._prompt_cache.insert_cache(model_id, list(tokens), cache)
        del self._unstored[:len(stored)]  # only now: until stored, they count as pending

    def _forget(self, model_id: str) -> None:
        """An unloaded model's prompt caches go with it (registry.unload, on the engine thread)."""
        self._unstored = [item for item in self._unstored if item[0] != model_id]
        self._prompt_cache.drop_model(model_id)
        self._embed_seconds_per_token.pop(model_id, None)

    def _drop_cancelled(self) -> None:
        for resident in self.registry.residents.values():
            gone = [uid for uid, seq in resident.sequences.items() if seq.stream.cancelled]
            if gone:
                resident.generator.remove(gone)
                for uid in gone:
                    self._finish(resident.sequences.pop(uid).stream, None)
                self._stats.requests_cancelled_total += len(gone)

    def _step(self, resident: Resident) -> None:
        prefills = len(resident.sequences) > len(resident.generator._generation_batch)  # noqa: SLF001
        started = time.monotonic()
        try:
            _, responses = resident.generator.next()
        except Exception as exc:
            # The batch's state is unknown after a failed step: fail its requests, start afresh.
            log.exception("generation step failed")
            for seq in resident.sequences.values():
                self._finish(seq.stream, TokenEvent(error=f"Generation failed: {exc}"))
            resident.sequences.clear()
            resident.generator.close()
            resident.generator = self._new_generator(resident.loaded)
            # mlx-lm's compiled samplers thread MLX's global random state through the graph; a
            # step that raised inside one leaves that state unevaluable ("eval an array without a
            # primitive") for every later request: give it a fresh state.
            mx.random.seed(time.time_ns() % (1 << 32))
            return
        if not prefills and resident.generator._generation_batch.forwarded:  # noqa: SLF001
            self._decode_seconds = time.monotonic() - started
        self._stats.steps_total += 1
        self._stats.generated_tokens_total += len(responses)
        # Every event of the step goes out before the finished sequences' caches are stored: stored
        # one by one in between, the last answer of a wave reached its client ~30 ms after the first.
        finished: list[tuple[list[int], list[Any] | None]] = []
        for response in responses:
            seq = resident.sequences.get(response.uid)
            if seq is not None and seq.errors:
                resident.generator.remove([response.uid])
                del resident.sequences[response.uid]
                self._finish(seq.stream, TokenEvent(error=f"Generation failed: {seq.errors[0]}"))
                continue
            if seq is not None:
                self._emit(resident, response.uid, seq, response, finished)
            if response.finish_reason is not None:
                finished.append((response.all_tokens, response.prompt_cache))
        if self.prompt_cache_enabled:
            model_id = resident.loaded.model_id
            self._unstored += [(model_id, tokens, cache) for tokens, cache in finished if cache is not None and tokens]

    def _emit(self, resident: Resident, uid: int, seq: _Sequence, response: Any,
              finished: list[tuple[list[int], list[Any] | None]]) -> None:
        token, finish = response.token, response.finish_reason
        seq.completion_tokens += 1
        logprobs = []
        if not (finish == "stop" and token in seq.eos_ids):
            seq.detokenizer.add_token(token)  # the end-of-turn token is not part of the answer
            if seq.logprobs is not None:
                logprobs.append(token_logprob(response.logprobs, token, seq.logprobs))
        if finish is not None:
            seq.detokenizer.finalize()
        text, hit_stop = seq.stop.feed(seq.detokenizer.last_segment)
        if hit_stop:
            finish = "stop"
            for cache, tokens in resident.generator.remove([uid], return_prompt_caches=True).values():
                finished.append((tokens, cache))
        elif finish is not None:
            text += seq.stop.flush()
        event = TokenEvent(
            text=text,
            token_ids=[token],
            finish_reason=finish,
            stop_sequence=hit_stop,
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=seq.completion_tokens,
            logprobs=logprobs,
        )
        if finish is None:
            seq.stream.put(event)
        else:
            del resident.sequences[uid]
            self.registry.touch(resident)  # keep-alive counts from the last answer
            self._finish(seq.stream, event)

    def _finish(self, stream: TokenStream, event: TokenEvent | None) -> None:
        if event is not None:
            stream.put(event)
            if event.error:
                self._stats.requests_failed_total += 1
            else:
                self._stats.requests_finished_total += 1
        self._release()

    def _fail_all(self, message: str) -> None:
        held, self._held = self._held, []
        for job in list(self._embeddings):
            self._end_embedding(job, EngineGone(message))
        for _, stream in held:
            self._finish(stream, TokenEvent(error=message))
        for resident in self.registry.residents.values():
            for seq in resident.sequences.values():
                self._finish(seq.stream, TokenEvent(error=message))
            resident.sequences.clear()
        for pending in self.registry.abandon_loads():
            for future in pending.waiters:
                future.set_exception(ModelLoadError(message))
        while True:
            try:
                kind, payload, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "generate":
                self._finish(reply, TokenEvent(error=message))
            elif kind == "embed":
                self._embeddings.append(payload)
                self._end_embedding(payload, EngineGone(message))
            elif kind == "load":
                reply.set_exception(ModelLoadError(message))

