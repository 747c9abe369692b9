"""The inference engine: one OS thread that owns every MLX call.

HTTP threads call ``submit(request) -> TokenStream`` and read their stream; the engine thread
loads models (slices.py), holds a burst of requests together (admission.py), admits them into the
running batch of their model's backend (backends/: mlx-lm's ``BatchGenerator`` for MLX models,
continuous batching, prompt-prefix reuse through prompt_cache.py), steps every batch (one token
per active sequence, through the shared text step, text.py), and drops a sequence whose client
has gone. A llama.cpp model steps on a thread of its own (its backend says so). Why one thread:
MLX aborted the process at exit when several threads drove one model, and every new thread
touching MLX leaked OS threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import mlx.core as mx

from gerdsen_ai_server.engine.admission import ADMIT_POLL_S, Admission
from gerdsen_ai_server.engine.backends.base import Backend, Host, LoadedModel, NoGeneration
from gerdsen_ai_server.engine.backends.mlx import MLXBackend, prefill_size
from gerdsen_ai_server.engine.commands import BatchLimit, Command, Embed, Load, Submit, Unload, Wake
from gerdsen_ai_server.engine.dtype import default_compute_dtype
from gerdsen_ai_server.engine.embeddings import EmbeddingJob
from gerdsen_ai_server.engine.errors import ContextLengthExceeded, EngineGone, EngineOverloaded
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.engine.options import EngineOptions, LoadOptions
from gerdsen_ai_server.engine.prompt_cache import PrefixCache
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.engine.registry import ModelRegistry, Resident
from gerdsen_ai_server.engine.slices import Embeddings, Loads
from gerdsen_ai_server.engine.stats import EngineStats
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound

# Their old home: callers outside the engine still import these names from here.
__all__ = ["ContextLengthExceeded", "EngineOptions", "EngineOverloaded", "EngineStats", "InferenceEngine"]

log = logging.getLogger(__name__)


class InferenceEngine:
    def __init__(
        self,
        options: EngineOptions,
        *,
        loader: LoaderFactory | None = None,
        events: EventBus | None = None,
        on_crash: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self.models_dir = options.models_dir
        self.max_batch = options.max_batch
        self.max_queue = options.max_queue
        self.compute_dtype = default_compute_dtype(options.compute_dtype)
        self.events = events or EventBus()
        self._stats = EngineStats(max_batch=options.max_batch)
        self.registry = ModelRegistry(
            loader=loader or LoaderFactory(options.backend_options),
            models_dir=options.models_dir,
            compute_dtype=self.compute_dtype,
            compute_setting=options.compute_dtype,  # chosen per model: engine/dtype.py
            budget_bytes=options.memory_budget,
            keep_alive=options.keep_alive,
            open_backend=self._open_backend,
            events=self.events,
            on_unload=self._forget,
        )
        self._commands: queue.Queue[Command] = queue.Queue()
        self._inflight = 0
        self._admission = Admission(options.admit_window)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._running = threading.Event()
        self.prompt_cache = PrefixCache(
            options.prompt_cache_bytes, self._stats, options.models_dir, options.prompt_cache_disk_bytes
        )
        self._loads = Loads(self.registry)
        self._embeddings = Embeddings(self.registry, self._stats, self._release)
        # Called if the engine thread dies: the app makes the worker exit so Gunicorn replaces it
        # rather than leaving a process that can only answer errors.
        self._on_crash = on_crash
        # A cap below max_batch while the machine runs hot (monitor.ThermalGovernor); None: no cap.
        self.batch_limit: int | None = None
        self._thread = threading.Thread(target=self._run, name="impetus-engine", daemon=True)
        self.started_at = time.time()

    # ---- wiring (app.py builds it, services.py hands it to the routes) -----------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is in flight and stop stepping; returns once the loop has left."""
        self._stopping.set()
        self._commands.put(Wake())
        deadline = time.monotonic() + timeout
        while self._running.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.prompt_cache.disk.flush(max(0.0, deadline - time.monotonic()))  # its last files, written

    def is_alive(self) -> bool:
        return self._running.is_set() and not self._stopping.is_set()

    @property
    def prompt_cache_enabled(self) -> bool:
        return self.prompt_cache.enabled

    @prompt_cache_enabled.setter
    def prompt_cache_enabled(self, enabled: bool) -> None:
        self.prompt_cache.enabled = enabled

    @property
    def admit_window(self) -> float:
        """Seconds an idle engine may wait for the rest of a burst of requests before prefilling."""
        return self._admission.window

    @admit_window.setter
    def admit_window(self, seconds: float) -> None:
        self._admission.window = seconds

    # ---- caller side (any thread) ------------------------------------------------------
    def load_model(
        self,
        spec: str,
        keep_alive: float | None = None,
        pinned: bool = False,
        *,
        trusted: bool = False,
        allowed: Sequence[Path] = (),
        options: LoadOptions | None = None,
    ) -> Future[LoadedModel]:
        """Load on the engine thread (``keep_alive``: idle seconds, None for the server default, inf to keep).

        ``spec`` is untrusted unless ``trusted`` (only the operator's own, never a request's): it then
        resolves inside the models dir or under ``allowed`` (IMPETUS_MODEL_PATHS) only (registry.begin_load).
        ``options``: context length, chat template, adapter, backend and the resident's id (options.py).
        """
        future: Future[LoadedModel] = Future()
        self._commands.put(Load(spec, keep_alive, pinned, trusted, tuple(allowed), future, options or LoadOptions()))
        return future

    def unload_model(self, model_id: str) -> Future[None]:
        future: Future[None] = Future()
        self._commands.put(Unload(model_id, future))
        return future

    def embed(self, model_id: str, inputs: list[list[int]], segments: list[int] | None = None) -> EmbeddingJob:
        """Pooled, normalised hidden states of each input, computed on the engine thread in slices
        between decode steps; ``job.future`` has them. Counts against the same capacity as a
        generation (EngineOverloaded beyond it) until it ends or the caller cancels the job.
        A reranker's pairs pass ``segments`` (EmbeddingJob) and get one score each."""
        self.get_model(model_id)
        self._reserve()
        job = EmbeddingJob(model_id, inputs, segments)
        self._commands.put(Embed(job))
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
        """A snapshot: the live counters, and every backend's sequences (decoding, or waiting)."""
        snapshot = EngineStats(**vars(self._stats))
        snapshot.requests_in_flight = self._inflight
        snapshot.prompt_cache_bytes = self.prompt_cache.nbytes
        for resident in list(self.registry.residents.values()):
            running, waiting = resident.backend.counts()
            snapshot.active_sequences += running
            snapshot.queued_sequences += waiting
        snapshot.queued_sequences += len(self._admission.held)
        return snapshot

    def set_batch_limit(self, limit: int | None) -> None:
        """Decode at most ``limit`` sequences per step (None: ``max_batch``), from the next loop turn.
        Running sequences finish; new ones wait until the batch is below the cap."""
        self._commands.put(BatchLimit(limit))

    def submit(self, request: GenerationRequest) -> TokenStream:
        loaded = self.get_model(request.model)
        prompt_len = len(request.prompt_tokens)
        if prompt_len + request.max_tokens > loaded.context_length:
            raise ContextLengthExceeded(prompt_len, request.max_tokens, loaded.context_length)
        self._reserve()
        stream = TokenStream(request, self.is_alive)
        resident = self.registry.get(request.model)
        if resident is not None and resident.backend.capabilities.threaded:  # it admits from any thread
            resident.backend.admit(request, stream)
            return stream
        self._commands.put(Submit(request, stream))
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
    def _stepped(self) -> list[Backend]:
        """The backends this thread steps (a threaded one steps itself)."""
        return [r.backend for r in self.registry.residents.values() if not r.backend.capabilities.threaded]

    def _run(self) -> None:
        if self.options.mlx_cache_limit is not None:
            # MLX keeps freed buffers for reuse, by default up to its whole memory limit: bound it
            # so a long-running server's RSS settles instead of creeping up.
            mx.set_cache_limit(self.options.mlx_cache_limit)
        self._running.set()
        crash_after = self.options.crash_after_steps  # fault injection for the reliability tests
        try:
            while not self._stopping.is_set():
                decoding = any(b.busy for b in self._stepped())
                busy = decoding or bool(self.registry.loading) or bool(self._embeddings.jobs)
                self._drain_commands(
                    None if busy or self.prompt_cache.pending else ADMIT_POLL_S if self._admission.held else 0.5
                )
                self._admit_held()
                for backend in self._stepped():
                    backend.cancel()
                self.registry.expire_idle()
                stepped = self._stepped()
                self.prompt_cache.store(None if any(b.busy for b in stepped) else 1)
                for backend in stepped:
                    if backend.busy:
                        backend.step()
                        if backend.decode_seconds:  # what one more token takes: the admission's quiet gap
                            self._admission.decode_seconds = backend.decode_seconds
                decoding = any(b.busy for b in self._stepped())
                self._loads.advance(decoding)
                self._embeddings.advance(decoding, holding=bool(self._admission.held))
                if crash_after and self._stats.steps_total >= crash_after:
                    raise RuntimeError(f"injected fault: engine crash after {crash_after} steps")
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
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: Command) -> None:
        match command:
            case Load():
                self._load(command)
            case Unload(model_id, reply):
                try:
                    self.registry.unload(model_id)
                    reply.set_result(None)
                except ModelLoadError as exc:
                    reply.set_exception(exc)
            case Submit(request, stream):
                self._admission.receive(request, stream)
            case BatchLimit(limit):
                self.batch_limit = limit
                for resident in self.registry.residents.values():
                    resident.backend.set_batch_limit(self._batch_size)
            case Embed(job):
                self._embeddings.add(job)
            case Wake():
                pass

    def _load(self, command: Load) -> None:
        future = command.reply
        try:
            found = self.registry.begin_load(
                command.spec,
                keep_alive=command.keep_alive,
                pinned=command.pinned,
                trusted=command.trusted,
                allowed=command.allowed,
                options=command.options,
            )
        except ModelLoadError as exc:
            future.set_exception(exc)
            return
        except Exception as exc:  # a broken model file must never take the engine down
            log.exception("loading %s failed", command.spec)
            future.set_exception(ModelLoadError(f"Could not load '{command.spec}': {exc}"))
            return
        if isinstance(found, Resident):
            future.set_result(found.loaded)
        else:
            found.waiters.append(future)  # answered by Loads.advance when the load ends

    def _admit_held(self) -> None:
        """Start the held requests, unless more of their burst may still come and there is room
        for it (admission.py): room is the batch's free sequences, at most one prefill pass."""
        if not self._admission.held:
            return
        free = self._batch_size - sum(sum(b.counts()) for b in self._stepped())
        for request, stream in self._admission.take(min(free, prefill_size(self._batch_size))):
            self._admit(request, stream)

    @property
    def _batch_size(self) -> int:
        """Sequences decoded together per step: max_batch, or the thermal cap below it."""
        return min(self.max_batch, self.batch_limit or self.max_batch)

    def _open_backend(self, loaded: LoadedModel) -> Backend:
        """The backend of a model just loaded (registry.advance), reporting to this engine."""
        backend: Backend
        if loaded.kind == "embedding":
            backend = NoGeneration(loaded.nbytes)
        elif loaded.backend == "mlx":
            backend = MLXBackend(
                loaded, self.prompt_cache, self.max_batch, self._batch_size, self.options.prefill_bucket
            )
        else:  # started by its loader: llama.cpp batches on its own thread, within the same (thermal) cap
            backend = loaded.model
            self.prompt_cache.attach_llamacpp(loaded)  # its slots saved to and restored from the disk tier
        backend.bind(self._host(loaded.model_id))
        backend.set_batch_limit(self._batch_size)
        return backend

    def _host(self, model_id: str) -> Host:
        def touch() -> None:
            resident = self.registry.get(model_id)
            if resident is not None:
                self.registry.touch(resident)

        return Host(stats=self._stats, finish=self._finish, touch=touch)

    def _admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        if stream.cancelled:  # the client left while its request waited
            self._finish(stream, None)
            self._stats.requests_cancelled_total += 1
            return
        resident = self.registry.get(request.model)
        if resident is None:
            self._finish(stream, TokenEvent(error=f"The model '{request.model}' is not loaded."))
            return
        resident.backend.admit(request, stream)

    def _forget(self, model_id: str) -> None:
        """An unloaded model's prompt caches go with it (registry.unload, on the engine thread)."""
        self.prompt_cache.forget(model_id)
        self._embeddings.forget(model_id)

    def _finish(self, stream: TokenStream, event: TokenEvent | None) -> None:
        """A request's end (base.Host.finish): its last event, the counters, its place given back."""
        if event is not None:
            stream.put(event)
            if event.error:
                self._stats.requests_failed_total += 1
            else:
                self._stats.requests_finished_total += 1
        self._release()

    def _fail_all(self, message: str) -> None:
        for job in list(self._embeddings.jobs):
            self._embeddings.end(job, EngineGone(message))
        for _, stream in self._admission.release():
            self._finish(stream, TokenEvent(error=message))
        for resident in self.registry.residents.values():
            resident.backend.abort(message)
        for pending in self.registry.abandon_loads():
            for future in pending.waiters:
                future.set_exception(ModelLoadError(message))
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case Submit(_, stream):
                    self._finish(stream, TokenEvent(error=message))
                case Embed(job):
                    self._embeddings.end(job, EngineGone(message))
                case Load(reply=reply):
                    reply.set_exception(ModelLoadError(message))
                case Unload(reply=reply):
                    reply.set_exception(ModelLoadError(message))
