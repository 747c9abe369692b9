"""Resident models under a memory budget.

Runs on the engine thread (loading is MLX work). Models are admitted only if their estimated
size fits the budget, evicting least-recently-used idle models first; a model that is
generating is never evicted; idle models unload after their keep-alive; the default model is
pinned so readiness never flips because of idleness. A load runs in steps (``begin_load``, then
``advance`` until it returns the resident) that the engine interleaves with decoding; its
estimated size is reserved in the budget while it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from gerdsen_ai_server.engine import dtype, quantized_cache
from gerdsen_ai_server.engine.backends.base import Backend, LoadedModel
from gerdsen_ai_server.engine.errors import ModelBusy, ModelPinned, OverBudget
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.engine.options import InvalidLoadOption, LoadOptions
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, ModelRefused
from gerdsen_ai_server.store.paths import redact_paths

__all__ = ["ModelBusy", "ModelPinned", "ModelRegistry", "OverBudget", "PendingLoad", "Resident"]  # errors: errors.py

log = logging.getLogger(__name__)


@dataclass
class Resident:
    loaded: LoadedModel
    backend: Backend  # what generates with it (backends/base.py), opened by the engine when it loaded
    keep_alive: float  # seconds idle before unloading; math.inf keeps it
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    warmup: Any = None  # schemas.models.WarmupResult, once a load with warmup: true has run
    options: LoadOptions = LoadOptions()  # what it was loaded with (context length, template, adapter...)
    compute: dtype.DtypeChoice | None = None  # the dtype it computes in, and why (engine/dtype.py)

    @property
    def busy(self) -> bool:
        """Whether its backend holds a request (running or waiting): never evicted or unloaded then."""
        return self.backend.busy


@dataclass
class PendingLoad:
    """A load in progress: ``steps`` is the loader's generator; ``waiters`` are the engine's futures."""

    model_id: str
    need: int  # estimated bytes, reserved in the budget until the load ends
    keep_alive: float
    pinned: bool
    steps: Generator[None, None, LoadedModel]
    waiters: list[Any] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    allowed: tuple[Path, ...] = ()  # IMPETUS_MODEL_PATHS of the request: its folders are redacted from errors
    options: LoadOptions = LoadOptions()
    compute: dtype.DtypeChoice | None = None


class ModelRegistry:
    def __init__(
        self,
        *,
        loader: LoaderFactory,
        models_dir: Path,
        compute_dtype: str | None,
        budget_bytes: int,
        keep_alive: float,
        open_backend: Callable[[LoadedModel], Backend],
        events: EventBus,
        on_unload: Callable[[str], None],
        compute_setting: str = "auto",
    ) -> None:
        self.loader = loader
        self.models_dir = models_dir
        self.compute_dtype = compute_dtype  # the engine-wide preference (/health); each load chooses its own
        self.compute_setting = compute_setting  # IMPETUS_COMPUTE_DTYPE
        self.budget_bytes = budget_bytes
        self.keep_alive = keep_alive
        self._open_backend = open_backend
        self._events = events
        self._on_unload = on_unload  # the engine drops what it keeps for the model (its prompt caches)
        self.residents: dict[str, Resident] = {}
        self.loading: dict[str, PendingLoad] = {}

    def get(self, model_id: str) -> Resident | None:
        return self.residents.get(model_id)

    def used_bytes(self) -> int:
        return sum(r.loaded.nbytes for r in self.residents.values())

    def reserved_bytes(self) -> int:
        """Estimated bytes of the models being loaded now."""
        return sum(p.need for p in self.loading.values())

    def canonical_id(self, spec: str) -> str:
        """A filesystem path is known by its folder name; an id (``org/name`` included) by itself.

        Pure string work (no ``~`` expansion, no file system): it only names, never finds.
        """
        path = Path(spec)
        return path.name if path.is_absolute() or spec.startswith((".", "~")) else spec

    def begin_load(
        self,
        spec: str,
        *,
        keep_alive: float | None = None,
        pinned: bool = False,
        trusted: bool = False,
        allowed: Sequence[Path] = (),
        options: LoadOptions | None = None,
    ) -> Resident | PendingLoad:
        """The resident model, or its load in progress (started now if none is): finish it with ``advance``.

        ``spec`` is untrusted unless ``trusted`` (the operator's own: the default model, the CLI): an
        untrusted spec is the id of a resident model, or resolves inside the models dir or under
        ``allowed`` (IMPETUS_MODEL_PATHS), else one uniform ModelNotFound (``store.paths.confine``).
        Room is made (and the estimate reserved) before loading starts, so two loads at once
        cannot both count on the same free memory; a second load of a model joins the first.

        ``options`` (engine/options.py) load it with a context length, chat template, adapter or
        backend of its own, under ``options.alias`` when given. A load with default options joins
        whatever is resident under the id; one with other options than the resident's replaces it
        once it is idle (Ollama reloads a model whose ``num_ctx`` changed), else ModelBusy.
        """
        options = options or LoadOptions()
        if not trusted and options.alias is None:  # a model in memory is named by its id: no path is looked at
            known = self.residents.get(spec) or self.loading.get(spec)
            if known is not None and self._compatible(known, options):
                return self._join(known, keep_alive, pinned)
        try:
            path = self.loader.resolve(spec, self.models_dir, trusted=trusted, allowed=allowed, options=options)
        except Exception as exc:
            raise self._public(exc, spec, allowed) from None
        model_id = options.alias or self.canonical_id(spec)
        known = self.residents.get(model_id) or self.loading.get(model_id)
        # An alias that names a resident of another model (an edited preset): replaced like other options.
        other = options.alias is not None and isinstance(known, Resident) and Path(known.loaded.path) != Path(path)
        if known is not None and self._compatible(known, options) and not other:
            return self._join(known, keep_alive, pinned)
        try:  # the options checked (a context beyond the model's bound...) before a resident makes way
            compute = self.choose_dtype(path, options, model_id)
            need = self.loader.estimate_bytes(path, compute.dtype, options)
        except Exception as exc:
            raise self._public(exc, spec, allowed) from None
        if known is not None:
            self._replace(known, model_id)
        keep = self.keep_alive if keep_alive is None else keep_alive
        try:
            self._make_room(need, model_id)
        except Exception as exc:
            raise self._public(exc, spec, allowed) from None
        self._events.publish("model_event", event="loading", model=model_id, bytes=need)
        steps = self.loader.load_path_steps(path, self.models_dir, compute_dtype=compute.dtype, options=options)
        pending = PendingLoad(
            model_id, need, keep, pinned, steps, allowed=tuple(allowed), options=options, compute=compute
        )
        self.loading[model_id] = pending
        return pending

    def choose_dtype(self, path: Path, options: LoadOptions | None = None, model_id: str = "") -> dtype.DtypeChoice:
        """The dtype a load of the resolved ``path`` computes in (engine/dtype.py says the rule): float32
        on CPU under IMPETUS_COMPUTE_DTYPE=auto only where its weights and KV cache fit the budget less
        what the other pinned models hold; a GGUF on llama.cpp keeps its own types."""
        if path.suffix.lower() == ".gguf":
            return dtype.DtypeChoice(None, "llama.cpp computes with the GGUF's own types")
        fp32 = self.loader.estimate_bytes(path, "float32", options) if self.compute_setting == "auto" else 0
        pinned = sum(r.loaded.nbytes for i, r in self.residents.items() if r.pinned and i != model_id)
        context = self.loader.context_of(path, options)
        kv_bits = (options or LoadOptions()).kv_bits_for(self.loader.options.kv_bits)  # charged quantized
        return dtype.choose(
            self.compute_setting,
            fp32_bytes=fp32,
            kv_fp32_bytes_per_token=quantized_cache.charged_bytes(dtype.kv_bytes_per_token(path, 4), 4, kv_bits),
            context=context,
            room_bytes=self.budget_bytes - pinned,
            quantized=dtype.is_quantized(path),
        )

    @staticmethod
    def _compatible(known: Resident | PendingLoad, options: LoadOptions) -> bool:
        """Whether a load with ``options`` may use ``known``: default options take any resident."""
        return options.is_default or known.options.model_options() == options.model_options()

    def _replace(self, known: Resident | PendingLoad, model_id: str) -> None:
        """Make way for a load of ``model_id`` with other options: unload the idle resident (pinned:
        ModelPinned), refuse while it generates or loads (ModelBusy)."""
        if isinstance(known, PendingLoad):
            raise ModelBusy(f"The model '{model_id}' is loading with other options; try again when it is loaded.")
        self.unload(model_id, reason="reloading")

    def _join(self, known: Resident | PendingLoad, keep_alive: float | None, pinned: bool) -> Resident | PendingLoad:
        """A load of a model that is resident or loading already: touch it, or join its load."""
        if isinstance(known, Resident):
            self.touch(known, keep_alive)
            known.pinned = known.pinned or pinned
            return known
        known.pinned = known.pinned or pinned
        if keep_alive is not None:
            known.keep_alive = keep_alive
        return known

    def _public(self, exc: Exception, spec: str, allowed: Sequence[Path]) -> ModelLoadError:
        """``exc`` as the ModelLoadError a client may see: host paths redacted (``store.paths.redact_paths``).
        The log keeps the whole message, for the operator."""
        if isinstance(exc, ModelRefused | InvalidLoadOption):  # say nothing but the spec and the model's limits
            log.info("refused model %r: %s", spec, exc)
            return exc
        if not isinstance(exc, ModelLoadError):
            log.exception("loading %s failed", spec)
            exc = ModelLoadError(f"Could not load '{spec}': {type(exc).__name__}: {exc}")
        else:  # a missing model is routine (info); one that fails to load is worth a warning
            log.log(
                logging.INFO if isinstance(exc, ModelNotFound) else logging.WARNING, "loading %r failed: %s", spec, exc
            )
        return type(exc)(redact_paths(str(exc), self.models_dir, allowed))

    def advance(self, pending: PendingLoad) -> Resident | None:
        """One step of a load: the new resident once it is done, else None. A failure raises
        ModelLoadError (anything else is wrapped in one; host paths redacted) and abandons the load."""
        try:
            next(pending.steps)
            return None
        except StopIteration as done:
            loaded: LoadedModel = done.value
        except Exception as exc:
            del self.loading[pending.model_id]
            public = self._public(exc, pending.model_id, pending.allowed)
            self._events.publish("model_event", event="failed", model=pending.model_id, error=str(public))
            raise public from None
        del self.loading[pending.model_id]
        model_id = loaded.model_id = pending.model_id
        resident = Resident(
            loaded,
            self._open_backend(loaded),
            keep_alive=pending.keep_alive,
            pinned=pending.pinned,
            options=pending.options,
            compute=pending.compute,
        )
        self.residents[model_id] = resident
        seconds = time.monotonic() - pending.started
        compute = pending.compute or dtype.DtypeChoice(None, "")
        log.info(
            "loaded %s (%.0f MB, estimated %.0f MB) in %.1f s, computing in %s: %s",
            model_id,
            loaded.nbytes / 1e6,
            pending.need / 1e6,
            seconds,
            compute.name,
            compute.reason,
        )
        self._events.publish(
            "model_event", event="loaded", model=model_id, bytes=loaded.nbytes, seconds=round(seconds, 3)
        )
        return resident

    def abandon_loads(self) -> list[PendingLoad]:
        """Drop every load in progress (the engine is stopping); their waiters are the caller's to fail."""
        pending, self.loading = list(self.loading.values()), {}
        for load in pending:
            load.steps.close()
        return pending

    def touch(self, resident: Resident, keep_alive: float | None = None) -> None:
        resident.last_used = time.monotonic()
        if keep_alive is not None:
            resident.keep_alive = keep_alive

    def unload(self, model_id: str, reason: str = "unloaded") -> None:
        resident = self.residents.get(model_id)
        if resident is None:
            return
        if resident.pinned:
            raise ModelPinned(
                f"The model '{model_id}' is the server's default model (IMPETUS_DEFAULT_MODEL), pinned "
                "so that the server stays ready: it cannot be unloaded while the server runs."
            )
        if resident.busy:
            raise ModelBusy(
                f"The model '{model_id}' is generating ({sum(resident.backend.counts())} requests); "
                "unload it when they finish."
            )
        del self.residents[model_id]
        resident.backend.close()
        del resident
        self._on_unload(model_id)
        mx.clear_cache()  # hand the freed buffers back rather than keeping them cached
        self._events.publish("model_event", event=reason, model=model_id)

    def expire_idle(self) -> None:
        now = time.monotonic()
        for model_id, resident in list(self.residents.items()):
            if not resident.pinned and not resident.busy and now - resident.last_used >= resident.keep_alive:
                self.unload(model_id, reason="expired")

    def _make_room(self, need: int, model_id: str) -> None:
        if need > self.budget_bytes:
            raise OverBudget(
                f"The model '{model_id}' needs about {need / 2**30:.2f} GiB, more than the whole "
                f"memory budget ({self.budget_bytes / 2**30:.2f} GiB, IMPETUS_MEMORY_BUDGET)."
            )
        idle = sorted((r for r in self.residents.values() if not r.busy and not r.pinned), key=lambda r: r.last_used)
        while self.used_bytes() + self.reserved_bytes() + need > self.budget_bytes:
            if not idle:
                raise OverBudget(
                    f"The model '{model_id}' needs about {need / 2**30:.2f} GiB; "
                    f"{(self.used_bytes() + self.reserved_bytes()) / 2**30:.2f} of {self.budget_bytes / 2**30:.2f} "
                    "GiB are held by models that are generating, pinned or loading. Unload one or raise "
                    "IMPETUS_MEMORY_BUDGET."
                )
            self.unload(idle.pop(0).loaded.model_id, reason="evicted")
