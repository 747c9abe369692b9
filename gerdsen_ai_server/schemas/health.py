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
    blas: str = Field(description="openblas, reference or accelerate.")
    allocator: str = Field(description="The C allocator under MLX: jemalloc, glibc or system.")
    prompt_cache_enabled: bool
    prompt_cache_bytes: int
    prompt_cache_limit_bytes: int
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
