"""Wire formats of model management under /api/models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gerdsen_ai_server.schemas.openai import REQUEST_CONFIG

# ---- pulls, deletion and discovery (api/admin/pulls.py) ---------------------------------------

PullStatusName = Literal["queued", "downloading", "done", "failed", "cancelled"]


class PullRequest(BaseModel):
    model_config = REQUEST_CONFIG  # strict types, as every JSON body (schemas/openai.py)

    model: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$",
        description="Hugging Face repo id, 'org/name'.",
        examples=["mlx-community/Qwen2.5-0.5B-Instruct-4bit"],
    )
    revision: str = Field("main", min_length=1, description="Branch, tag or commit.")
    gguf: str | None = Field(
        None,
        min_length=1,
        description="Fetch the one .gguf file matching this name or pattern "
        "(e.g. '*Q4_K_M.gguf') instead of safetensors weights.",
    )


class PullStatus(BaseModel):
    id: str
    object: Literal["model.pull"] = "model.pull"
    model: str
    revision: str
    status: PullStatusName
    bytes_done: int
    bytes_total: int | None = Field(None, description="Known once the hub has listed the files.")
    path: str | None = Field(None, description="The model's folder once done.")
    error: str | None = None
    created_at: float
    finished_at: float | None = None


class PullList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PullStatus]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class DiscoveredModel(BaseModel):
    id: str
    source: Literal["catalogue", "hub"]
    description: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    size_bytes: int | None = Field(None, description="Approximate bytes on disk.")
    memory_bytes: int | None = Field(
        None, description="Approximate bytes it takes resident, with this server's compute dtype."
    )
    fits: bool | None = Field(None, description="Whether memory_bytes is within the memory budget; null if unknown.")
    downloads: int | None = None
    local: bool = Field(False, description="Already in the models dir.")


class DiscoverQuery(BaseModel):
    """GET /api/models/discover's query parameters."""

    model_config = ConfigDict(extra="forbid")

    q: str = Field("", max_length=200, description="Search the hub for this; without it, the curated catalogue.")
    author: str = Field("mlx-community", max_length=100, description="Hub organisation to search ('' for any).")
    limit: int = Field(20, ge=1, le=100)


class DiscoverResponse(BaseModel):
    object: Literal["list"] = "list"
    source: Literal["catalogue", "hub"]
    query: str | None = None
    memory_budget_bytes: int
    hub_error: str | None = Field(
        None, description="Why the hub was not searched, when a query fell back to the catalogue."
    )
    data: list[DiscoveredModel]
