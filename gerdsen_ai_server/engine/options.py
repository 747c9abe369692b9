"""What the engine, its loaders and its backends take from the settings, as plain frozen values.

Built once from ``Settings`` where settings are read (app.py, the CLI, the bench) and passed down:
nothing under engine/ reads the environment, so an override given to ``create_app({...})`` (or a
test's own options) reaches every part, the llama.cpp backend and the loaders included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gerdsen_ai_server.config import Settings

BACKENDS = ("auto", "mlx", "llamacpp")


@dataclass(frozen=True)
class BackendOptions:
    """What the loaders and the llama.cpp backend need (IMPETUS_BACKEND, IMPETUS_MAX_BATCH,
    IMPETUS_LLAMACPP_THREADS): which backend runs a GGUF, and how a llama.cpp model is sized."""

    backend: str = "auto"  # one of BACKENDS; see backends/llamacpp.py serves_gguf
    sequences: int = 8  # KV slots of a llama.cpp model: IMPETUS_MAX_BATCH, as on MLX
    llamacpp_threads: int = 0  # CPU threads of each llama.cpp model (0: all cores)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")


@dataclass(frozen=True)
class EngineOptions:
    """The inference engine's settings (see config.py for what each one means)."""

    models_dir: Path
    max_batch: int = 8
    max_queue: int = 32
    compute_dtype: str = "auto"
    prompt_cache_bytes: int = 1 << 30
    memory_budget: int = 8 << 30
    keep_alive: float = 300.0
    crash_after_steps: int = 0  # fault injection for the reliability tests
    mlx_cache_limit: int | None = None
    admit_window: float = 0.0  # seconds (IMPETUS_ADMIT_WINDOW_MS / 1000)
    backend: str = "auto"
    llamacpp_threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        self.backend_options  # noqa: B018 - validates the backend now, not at the first GGUF

    @property
    def backend_options(self) -> BackendOptions:
        """What the loaders and the llama.cpp backend get."""
        return BackendOptions(self.backend, self.max_batch, self.llamacpp_threads)

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineOptions:
        """The engine's part of ``settings`` (already read and validated by the caller)."""
        return cls(
            models_dir=settings.models_dir,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            compute_dtype=settings.compute_dtype,
            prompt_cache_bytes=settings.prompt_cache_bytes,
            memory_budget=settings.memory_budget_bytes(),
            keep_alive=settings.keep_alive_seconds(),
            crash_after_steps=settings.fault_engine_crash_after_steps,
            mlx_cache_limit=settings.mlx_cache_limit,
            admit_window=settings.admit_window_ms / 1000,
            backend=settings.backend,
            llamacpp_threads=settings.llamacpp_threads,
        )
