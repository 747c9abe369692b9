"""Wire format of the probes: GET /health (details), /health/live and /health/ready."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gerdsen_ai_server.schemas.hardware import ThermalState


class ResidentModel(BaseModel):
    id: str
    path: str | None = Field(description="Where it was loaded from; null for a caller without a key when keys are set.")
    context_length: int
    bytes: int = Field(description="Bytes of weights in memory.")
    backend: Literal["mlx", "llamacpp"] = Field(description="The backend that runs it.")


class BackendReport(BaseModel):
    """What IMPETUS_BACKEND means on this machine (engine/backends/choice.py), said once at start too."""

    setting: Literal["auto", "mlx", "llamacpp"] = Field(description="IMPETUS_BACKEND.")
    default_model: Literal["mlx", "llamacpp"] = Field(description="The backend the embedded default model runs on.")
    gguf: Literal["mlx", "llamacpp"] = Field(
        description="The backend any other GGUF file runs on (mlx: converted once); an MLX folder always runs on MLX."
    )
    mlx_device: Literal["cpu", "metal", "cuda"] = Field(description="Where MLX computes on this machine.")
    reason: str = Field(description="Why: the setting, or what auto found on this machine.")


class CacheTier(BaseModel):
    """One tier of the prompt cache (engine/prompt_cache.py)."""

    hits: int = Field(description="Prompts whose cached prefix came from this tier (0 for live).")
    misses: int = Field(description="Prompts that found nothing in this tier (0 for live).")
    bytes: int = Field(description="Bytes of KV cache it holds.")
    limit_bytes: int = Field(description="Its bound (IMPETUS_PROMPT_CACHE_BYTES or _DISK_BYTES); 0: off.")
    entries: int = Field(description="Cached prefixes it holds (0 for live).")
    writes: int = Field(0, description="Disk: files written.")
    rejected: int = Field(0, description="Disk: files refused and deleted (corrupt, truncated, other weights).")


class PromptCacheTiers(BaseModel):
    live: CacheTier = Field(description="L1: the running batches' KV caches.")
    ram: CacheTier = Field(description="L2: finished prefixes in memory.")
    disk: CacheTier = Field(description="L3: finished prefixes on disk, found again after a restart.")


class HealthReport(BaseModel):
    status: Literal["ok", "degraded"]
    ready: bool
    reason: str = Field(description="Why the server is not ready, or 'ready'.")
    version: str
    pid: int | None = Field(description="The worker's process id; null for a caller without a key when keys are set.")
    uptime_s: float
    engine_alive: bool
    requests_in_flight: int
    compute_dtype: str
    backend: BackendReport
    blas: str = Field(description="openblas, reference or accelerate.")
    allocator: str = Field(description="The C allocator under MLX: jemalloc, glibc or system.")
    prompt_cache_enabled: bool
    prompt_cache_bytes: int
    prompt_cache_limit_bytes: int
    prompt_cache_tiers: PromptCacheTiers
    max_batch: int
    batch_limit: int | None = Field(
        description="The batch size while the machine is hot (thermal adaptation); null otherwise."
    )
    thermal_state: ThermalState | None
    models: list[ResidentModel]


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    reason: str
