"""Every setting of the server, read from ``IMPETUS_*`` environment variables.

One pydantic-settings class; ``docs/configuration.md`` documents each field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_models_dir() -> Path:
    return Path.home() / ".cache" / "impetus" / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMPETUS_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address Gunicorn binds to.")
    port: int = Field(8080, ge=0, le=65535, description="Port Gunicorn binds to.")
    threads: int = Field(64, ge=4, description="Gunicorn gthread threads: one per open stream, plus headroom.")
    models_dir: Path = Field(default_factory=_default_models_dir, description="Where local models and converted models live.")
    dashboard_dir: Path | None = Field(
        None, description="The dashboard's build served at / (index.html and assets/); unset: impetus-dashboard/dist of this checkout."
    )
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
    admit_window_ms: float = Field(
        50.0, ge=0, le=1000,
        description="A new request waits up to this long for the rest of its burst (while more keep arriving, at "
        "most one decode step apart), so that requests sent together, or clients coming back together, are "
        "prefilled in one pass instead of one stall of every stream each. 0: never wait.",
    )
    prompt_cache_bytes: int = Field(
        256 << 20, ge=0, description="Bytes of KV cache kept for reuse by later prompts sharing a prefix (0 disables)."
    )
    mlx_cache_limit: int = Field(
        512 << 20, ge=0,
        description="Bytes of freed buffers MLX may keep for reuse (mx.set_cache_limit); bounds RSS growth.",
    )
    malloc: Literal["auto", "jemalloc", "glibc"] = Field(
        "auto",
        description="The C allocator under MLX (Linux; `impetus serve` preloads it): 'auto' is jemalloc when installed "
        "(Debian/Ubuntu libjemalloc2; RSS levels off without page faults for fresh buffers, up to 30 % more throughput "
        "at 8 streams on a 2-core CPU), else glibc; 'glibc' keeps glibc's malloc with the two settings below.",
    )
    malloc_mmap_threshold: int = Field(
        256 << 10, ge=0, le=32 << 20,
        description="glibc: blocks of this many bytes or more get their own mapping and go back to the system when "
        "freed (mallopt M_MMAP_THRESHOLD); without it freed KV/activation buffers stay in the heap and RSS creeps up. "
        "At most 32 MiB; 0: glibc's default (no creep control, but no page faults for fresh mappings: ~12 % more "
        "throughput at 8 streams on a 2-core CPU, docs/performance.md). Not used under jemalloc.",
    )
    malloc_arena_max: int = Field(
        2, ge=0, le=64,
        description="glibc: heaps shared by all threads (mallopt M_ARENA_MAX); fewer arenas keep fewer freed scraps "
        "across Gunicorn's threads. 0: glibc's default (8 per core). Not used under jemalloc.",
    )
    memory_budget: int = Field(
        0, ge=0, description="Bytes resident models may take; 0 means 60% of this machine's RAM."
    )
    keep_alive: float = Field(
        300.0, description="Seconds an idle model stays loaded (negative: forever; the default model is always kept)."
    )
    autoload: bool = Field(True, description="Load a local model on demand when a request names one not resident.")
    backend: Literal["auto", "mlx", "llamacpp"] = Field(
        "auto",
        description="Which engine runs GGUF files: 'auto' (llama.cpp for your .gguf files when llama-cpp-python is "
        "installed; the embedded default model stays on MLX), 'mlx' (convert every GGUF to MLX) or 'llamacpp' "
        "(every GGUF on llama.cpp, the default model's included). MLX folders always run on MLX.",
    )
    llamacpp_threads: int = Field(0, ge=0, description="CPU threads of each llama.cpp model (0: all cores).")
    # ---- monitoring (monitor.py, metrics.py, api/realtime.py)
    metrics_interval: float = Field(
        1.0, ge=0.05, le=3600, description="Seconds between 'metrics' pushes to Socket.IO clients (and monitor samples)."
    )
    thermal_interval: float = Field(5.0, ge=0.05, description="Seconds between readings of the thermal state.")
    thermal_batch_size: int = Field(
        2, ge=0, description="Batch size while the thermal state is serious or critical (0: no thermal adaptation)."
    )
    fault_thermal_state: str = Field(
        "", pattern="^(|nominal|fair|serious|critical)$",
        description="Testing only: report this thermal state (nominal, fair, serious, critical) instead of the machine's.",
    )
    fault_engine_crash_after_steps: int = Field(
        0, ge=0, description="Testing only: kill the engine thread after this many decode steps (0: never)."
    )
    log_level: str = Field("info", description="Gunicorn and application log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per log line, with request id, route, status and duration."
    )
    # ---- production hardening (security.py, request_log.py, shutdown.py)
    api_keys: str = Field(
        "", description="Comma-separated API keys; when any key is set, requests need 'Authorization: Bearer KEY'."
    )
    api_key_file: Path | None = Field(None, description="File of API keys, one per line ('#' starts a comment).")
    protect_health: bool = Field(
        False, description="Require the key for /health and /metrics too (/health/live and /health/ready stay open)."
    )
    rate_limit: str = Field(
        "",
        description="Requests per API key (or per client IP without one), e.g. '60/minute' or '10/second;500/hour'; "
        "empty: no limit.",
    )
    redis_url: str = Field(
        "",
        description="Redis shared by replicas (redis://host:6379/0): Socket.IO's message queue (events reach the "
        "clients of every replica) and the rate-limit counters; empty: both in-process. See docs/deployment.md.",
    )
    trusted_proxies: int = Field(
        0, ge=0, le=16,
        description="Proxies in front of the server (load balancer hops) that set X-Forwarded-For/-Proto/-Host: "
        "the client's address for rate limits and logs is taken that many hops back; 0: the headers are ignored.",
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins browsers may call the API from ('*' for any); empty: none."
    )
    max_request_bytes: int = Field(8 << 20, ge=1024, description="Largest request body accepted; larger gets 413.")
    max_tokens_limit: int = Field(
        32768, ge=1, description="Largest max_tokens a request may ask for (the model's context bounds it too)."
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM; readiness is 503 meanwhile."
    )

    def memory_budget_bytes(self) -> int:
        if self.memory_budget:
            return self.memory_budget
        import psutil

        return int(psutil.virtual_memory().total * 0.6)

    def dashboard_path(self) -> Path:
        if self.dashboard_dir is not None:
            return self.dashboard_dir
        return Path(__file__).resolve().parent.parent / "impetus-dashboard" / "dist"

    def keep_alive_seconds(self) -> float:
        return math.inf if self.keep_alive < 0 else self.keep_alive

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            parse_many(value)  # ValueError: "couldn't parse rate limit string ..."
        return value.strip()

    def api_key_list(self) -> list[str]:
        """Every configured key: IMPETUS_API_KEYS and the lines of IMPETUS_API_KEY_FILE."""
        keys = [k.strip() for k in self.api_keys.split(",")]
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return [k for k in keys if k]

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @classmethod
    def from_mapping(cls, overrides: dict[str, Any] | None = None) -> Settings:
        """Environment first, then explicit overrides (as the app factory's ``config`` argument)."""
        return cls(**(overrides or {}))
