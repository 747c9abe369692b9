"""Wire formats of /api/models: resident and local models, load and unload, warm-up and benchmarks.

Request bodies share the OpenAI schemas' config: strict types and finite numbers (a ``keep_alive``
of NaN once made /api/models invalid JSON and kept the model loaded forever)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gerdsen_ai_server.schemas.openai import REQUEST_CONFIG


class LoadRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1, description="Model id, folder name under the models dir, or a path.")
    keep_alive: float | None = Field(
        None, description="Seconds to stay loaded when idle; negative keeps it; omitted uses IMPETUS_KEEP_ALIVE."
    )
    warmup: bool = Field(
        False,
        description="After loading, run a short prompt through the engine twice (the first run builds the "
        "sampler's compiled graph and the buffers) so the first real request is fast; reports TTFT cold vs warm.",
    )


class WarmupResult(BaseModel):
    prompt_tokens: int
    cold_ttft_ms: float = Field(description="Time to first token of the first request after loading.")
    warm_ttft_ms: float = Field(description="Time to first token of the same-length request right after it.")
    seconds: float = Field(description="Wall time the warm-up took.")
    finished_at: float = Field(description="Unix time.")


class UnloadRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)


class ModelUnloaded(BaseModel):
    id: str
    state: Literal["unloaded"] = "unloaded"


class ModelInfo(BaseModel):
    id: str
    state: Literal["resident", "local"]
    format: str | None = None
    kind: Literal["language", "embedding"] | None = Field(
        None,
        description="language: generates (and embeds); embedding: a dedicated embedding model, /v1/embeddings only.",
    )
    path: str | None = None
    size_bytes: int | None = Field(None, description="Bytes on disk.")
    memory_bytes: int | None = Field(None, description="Bytes of weights in memory while resident.")
    context_length: int | None = None
    busy: bool = False
    pinned: bool = False
    keep_alive: float | None = Field(None, description="Idle seconds before unloading; null: kept loaded.")
    idle_seconds: float | None = None
    warmup: WarmupResult | None = Field(None, description="Set once a load with warmup: true has warmed it.")
    error: str | None = None


class ModelsOverview(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    memory_budget_bytes: int
    memory_used_bytes: int


class BenchmarkRequest(BaseModel):
    model_config = REQUEST_CONFIG

    prompt_tokens: int = Field(128, ge=1, le=8192, description="Length of the synthetic prompt.")
    max_tokens: int = Field(64, ge=2, le=4096, description="Tokens to generate (end-of-sequence is suppressed).")


class BenchmarkResult(BaseModel):
    id: str
    object: Literal["model.benchmark"] = "model.benchmark"
    model: str
    created_at: float = Field(description="Unix time the run started.")
    prompt_tokens: int
    generated_tokens: int
    ttft_ms: float = Field(description="Submission to first token (prompt processing plus one step).")
    prompt_tokens_per_second: float = Field(description="prompt_tokens / TTFT.")
    generation_tokens_per_second: float = Field(description="Tokens after the first / time from first to last token.")
    peak_memory_bytes: int | None = Field(
        None, description="MLX's peak allocation during the run: every resident model and cache, not this one alone."
    )
    model_memory_bytes: int = Field(description="Bytes of this model's weights in memory.")
    compute_dtype: str = Field(description="Weights' dtype in memory ('as stored' when unchanged).")
    device: str = Field(description="MLX device the engine runs on (cpu or gpu).")
    other_requests: int = Field(description="Other requests in flight when the run started (they share the engine).")


class BenchmarkHistory(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[BenchmarkResult] = Field(description="Oldest first; the store keeps the most recent runs per model.")
