"""Every setting of the server, read from ``IMPETUS_*`` environment variables.

One pydantic-settings class; ``docs/configuration.md`` documents each field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_models_dir() -> Path:
    return Path.home() / ".cache" / "impetus" / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMPETUS_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address Gunicorn binds to.")
    port: int = Field(8080, ge=0, le=65535, description="Port Gunicorn binds to.")
    threads: int = Field(64, ge=4, description="Gunicorn gthread threads: one per open stream, plus headroom.")
    models_dir: Path = Field(default_factory=_default_models_dir, description="Where local models and converted models live.")
    default_model: str = Field(
        "smollm2-135m-instruct",
        description="Model loaded at start: the embedded default id, a local folder or a .gguf file.",
    )
    compute_dtype: str = Field(
        "auto",
        description="float32, bfloat16, float16, or 'auto' (float32 on CPU, where BLAS makes it the fast path; as stored on GPU).",
    )
    max_tokens_default: int = Field(512, ge=1, description="max_tokens used when a request gives none.")
    max_queue: int = Field(32, ge=0, description="Requests waiting for the engine beyond the running batch; more get 503.")
    max_batch: int = Field(8, ge=1, description="Sequences decoded together in one engine step.")
    prompt_cache_bytes: int = Field(
        256 << 20, ge=0, description="Bytes of KV cache kept for reuse by later prompts sharing a prefix (0 disables)."
    )
    mlx_cache_limit: int = Field(
        512 << 20, ge=0,
        description="Bytes of freed buffers MLX may keep for reuse (mx.set_cache_limit); bounds RSS growth.",
    )
    memory_budget: int = Field(
        0, ge=0, description="Bytes resident models may take; 0 means 60% of this machine's RAM."
    )
    keep_alive: float = Field(
        300.0, description="Seconds an idle model stays loaded (negative: forever; the default model is always kept)."
    )
    autoload: bool = Field(True, description="Load a local model on demand when a request names one not resident.")
    fault_engine_crash_after_steps: int = Field(
        0, ge=0, description="Testing only: kill the engine thread after this many decode steps (0: never)."
    )
    log_level: str = Field("info", description="Gunicorn and application log level.")

    def memory_budget_bytes(self) -> int:
        if self.memory_budget:
            return self.memory_budget
        import psutil

        return int(psutil.virtual_memory().total * 0.6)

    def keep_alive_seconds(self) -> float:
        return math.inf if self.keep_alive < 0 else self.keep_alive

    @classmethod
    def from_mapping(cls, overrides: dict[str, Any] | None = None) -> Settings:
        """Environment first, then explicit overrides (as the app factory's ``config`` argument)."""
        return cls(**(overrides or {}))
