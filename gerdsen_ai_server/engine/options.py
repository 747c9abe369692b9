"""What the engine, its loaders and its backends take from the settings, as plain frozen values.

Built once from ``Settings`` where settings are read (app.py, the CLI, the bench) and passed down:
nothing under engine/ reads the environment, so an override given to ``create_app({...})`` (or a
test's own options) reaches every part, the llama.cpp backend and the loaders included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gerdsen_ai_server.config import KV_BITS
from gerdsen_ai_server.schemas.models import MAX_CHAT_TEMPLATE_CHARS
from gerdsen_ai_server.store.errors import ModelLoadError

if TYPE_CHECKING:
    from gerdsen_ai_server.config import Settings

BACKENDS = ("auto", "mlx", "llamacpp")


class InvalidLoadOption(ModelLoadError):
    """A load option this model cannot take (a context beyond its bound, RoPE scaling it does not
    declare): a 400 naming ``param``. Its message names the model's limits, never a host path."""

    def __init__(self, message: str, param: str = "context_length") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class BackendOptions:
    """What the loaders and the llama.cpp backend need (IMPETUS_BACKEND, IMPETUS_MAX_BATCH,
    IMPETUS_LLAMACPP_THREADS): which backend runs a GGUF, and how a llama.cpp model is sized."""

    backend: str = "auto"  # one of BACKENDS; see backends/llamacpp.py serves_gguf
    sequences: int = 8  # KV slots of a llama.cpp model: IMPETUS_MAX_BATCH, as on MLX
    llamacpp_threads: int = 0  # CPU threads of each llama.cpp model (0: all cores)
    context_length: int = 0  # IMPETUS_CONTEXT_LENGTH: every load's default (0: the model's own)
    kv_bits: int = 0  # IMPETUS_KV_BITS: every load's KV cache quantization (0: f16)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, not {self.kv_bits}")


@dataclass(frozen=True)
class LoadOptions:
    """How one model is loaded beyond where it is: given per load (``POST /api/models/load``), by a
    preset (store/presets.py), or left at the server's defaults. Two residents of one model with
    different options are two models to the registry, each under its own id (``alias``).

    Every field's default means "as the server and the model's own files say"; a request's values
    are checked by whoever receives them (schemas, serving) before they reach the engine.
    """

    context_length: int = 0  # tokens; 0: IMPETUS_CONTEXT_LENGTH, whose 0 is the model's own trained length
    rope_scaling: bool = False  # allow a context beyond the trained length where the model declares RoPE scaling
    chat_template: str | None = None  # Jinja text replacing the model's chat template
    adapter: str | None = None  # a LoRA adapter's spec: confined to the models dir like a model's
    backend: str | None = None  # one of BACKENDS for this load; None: IMPETUS_BACKEND
    alias: str | None = None  # the resident's id (a preset's name); None: the spec's own id
    kv_bits: int | None = None  # KV cache quantization, one of KV_BITS (0: off); None: IMPETUS_KV_BITS
    mmproj: str | None = None  # a GGUF's projector (llamacpp_vision.py), located: None, the one beside it if any

    def __post_init__(self) -> None:
        if self.context_length < 0:
            raise ValueError(f"context_length must be >= 0, not {self.context_length}")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, not {self.kv_bits}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.chat_template is not None and len(self.chat_template) > MAX_CHAT_TEMPLATE_CHARS:
            raise ValueError(f"chat_template must be at most {MAX_CHAT_TEMPLATE_CHARS} characters")

    @property
    def is_default(self) -> bool:
        """Nothing asked beyond the server's defaults (an alias alone changes only the name)."""
        return self.model_options() == LoadOptions()

    def model_options(self) -> LoadOptions:
        """These options without the alias: what decides whether two loads make the same model."""
        return LoadOptions(
            self.context_length,
            self.rope_scaling,
            self.chat_template,
            self.adapter,
            self.backend,
            kv_bits=self.kv_bits,
            mmproj=self.mmproj,
        )

    def kv_bits_for(self, server_default: int) -> int:
        """The KV cache bits this load asks for: its own ``kv_bits``, else IMPETUS_KV_BITS. llama.cpp
        quantizes its cache by ``type_k``/``type_v`` (backends/llamacpp.py), MLX by the batched
        quantized cache of quantized_cache.py, which decides (``bits_for``) whether the model takes it."""
        return server_default if self.kv_bits is None else self.kv_bits


@dataclass(frozen=True)
class EngineOptions:
    """The inference engine's settings (see config.py for what each one means)."""

    models_dir: Path
    max_batch: int = 8
    max_queue: int = 32
    compute_dtype: str = "auto"
    prompt_cache_bytes: int = 1 << 30
    prompt_cache_disk_bytes: int = 0  # IMPETUS_PROMPT_CACHE_DISK_BYTES: the disk tier (0: off)
    memory_budget: int = 8 << 30
    keep_alive: float = 300.0
    crash_after_steps: int = 0  # fault injection for the reliability tests
    mlx_cache_limit: int | None = None
    admit_window: float = 0.0  # seconds (IMPETUS_ADMIT_WINDOW_MS / 1000)
    backend: str = "auto"
    llamacpp_threads: int = 0
    context_length: int = 0  # IMPETUS_CONTEXT_LENGTH
    kv_bits: int = 0  # IMPETUS_KV_BITS
    prefill_bucket: int = -1  # IMPETUS_PREFILL_BUCKET (-1: 64 on a GPU, off on a CPU; engine/prefill_buckets.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        self.backend_options  # noqa: B018 - validates the backend now, not at the first GGUF

    @property
    def backend_options(self) -> BackendOptions:
        """What the loaders and the llama.cpp backend get."""
        return BackendOptions(self.backend, self.max_batch, self.llamacpp_threads, self.context_length, self.kv_bits)

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineOptions:
        """The engine's part of ``settings`` (already read and validated by the caller)."""
        return cls(
            models_dir=settings.models_dir,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            compute_dtype=settings.compute_dtype,
            prompt_cache_bytes=settings.prompt_cache_bytes_value(),
            prompt_cache_disk_bytes=settings.prompt_cache_disk_bytes,
            memory_budget=settings.memory_budget_bytes(),
            keep_alive=settings.keep_alive_seconds(),
            crash_after_steps=settings.fault_engine_crash_after_steps,
            mlx_cache_limit=settings.mlx_cache_limit,
            admit_window=settings.admit_window_ms / 1000,
            backend=settings.backend,
            llamacpp_threads=settings.llamacpp_threads,
            context_length=settings.context_length,
            kv_bits=settings.kv_bits,
            prefill_bucket=settings.prefill_bucket,
        )
