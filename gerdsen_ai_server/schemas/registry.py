"""Wire formats of /api/models: resident and local models, load and unload."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Model id, folder name under the models dir, or a path.")
    keep_alive: float | None = Field(
        None, description="Seconds to stay loaded when idle; negative keeps it; omitted uses IMPETUS_KEEP_ALIVE."
    )


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)


class ModelInfo(BaseModel):
    id: str
    state: Literal["resident", "local"]
    format: str | None = None
    path: str | None = None
    size_bytes: int | None = Field(None, description="Bytes on disk.")
    memory_bytes: int | None = Field(None, description="Bytes of weights in memory while resident.")
    context_length: int | None = None
    busy: bool = False
    pinned: bool = False
    keep_alive: float | None = Field(None, description="Idle seconds before unloading; null: kept loaded.")
    idle_seconds: float | None = None
    error: str | None = None


class ModelsOverview(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    memory_budget_bytes: int
    memory_used_bytes: int
