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
        pattern=r"^(?:hf\.co/|huggingface\.co/)?[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)?$",
        description="Hugging Face repo id, 'org/name'; 'org/name:Q4_K_M' (or Ollama's 'hf.co/org/name:Q4_K_M') "
        "pulls the one .gguf file whose name ends in that tag.",
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
        None, description="Approximate bytes the registry charges for it here, in the dtype it would compute in."
    )
    fits: bool | None = Field(None, description="Whether memory_bytes is within the memory budget; null if unknown.")
    downloads: int | None = None
    local: bool = Field(False, description="Already in the models dir.")
    format: Literal["mlx", "gguf"] = Field("mlx", description="mlx: a safetensors folder; gguf: one .gguf file.")
    file: str | None = Field(None, description="The GGUF file to pull (POST /api/models/pull's gguf, `--file`).")
    backend: Literal["mlx", "llamacpp"] | None = Field(None, description="The backend that will run it here.")
    compute_dtype: str | None = Field(
        None, description="The dtype it will compute in here ('as stored': its own quantization)."
    )
    context_length: int | None = Field(None, description="The context memory_bytes counts its KV cache for.")
    faster: bool = Field(False, description="The faster build of this model on this machine (a GGUF on a CPU).")
    vision: bool = Field(False, description="A vision-language model: its chat takes images (a GGUF with its mmproj).")
    memory_note: str | None = Field(None, description="What memory_bytes counts, and why that dtype.")


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
