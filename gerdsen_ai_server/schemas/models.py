"""Wire formats of /api/models: resident and local models, load and unload, warm-up and benchmarks.

Request bodies share the OpenAI schemas' config: strict types and finite numbers (a ``keep_alive``
of NaN once made /api/models invalid JSON and kept the model loaded forever)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gerdsen_ai_server.schemas.openai import REQUEST_CONFIG

# A chat template given at load is Jinja text; the largest real ones (Qwen3's, gpt-oss') are ~20 KiB.
MAX_CHAT_TEMPLATE_CHARS = 256 << 10
MAX_CONTEXT_LENGTH = 1 << 24  # tokens: beyond any model's, so a typo is a 400 here, not a huge KV cache
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a preset's name, llama-server's --alias


class LoadRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1, description="Model id, folder name under the models dir, or a path.")
    keep_alive: float | None = Field(
        None, description="Seconds to stay loaded when idle; negative keeps it; omitted uses IMPETUS_KEEP_ALIVE."
    )
    adapter: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="A LoRA adapter to apply: an mlx-lm adapter folder (MLX) or a GGUF LoRA file (llama.cpp) in the "
        "models dir. The result is its own resident, '<model>+<adapter>'.",
    )
    mmproj: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="A GGUF model's multimodal projector (llama-server's --mmproj): an mmproj GGUF file in the "
        "models dir; the model then takes images. Omitted: an mmproj*.gguf beside the model in its folder.",
    )
    warmup: bool = Field(
        False,
        description="After loading, run a short prompt through the engine twice (the first run builds the "
        "sampler's compiled graph and the buffers) so the first real request is fast; reports TTFT cold vs warm.",
    )
    context_length: int | None = Field(
        None,
        ge=0,
        le=MAX_CONTEXT_LENGTH,
        description="Context length (tokens: prompt + completion); omitted or 0: IMPETUS_CONTEXT_LENGTH, else the "
        "model's trained length. Beyond the trained length is a 400 unless rope_scaling is true and the model "
        "declares RoPE scaling (then up to trained x factor). A llama.cpp model's KV cache is sized by it.",
    )
    rope_scaling: bool = Field(
        False,
        description="Allow a context_length beyond the trained length, up to what the RoPE scaling the model "
        "declares (config.json rope_scaling, GGUF rope.scaling.*) allows; omitted context_length then means that "
        "bound. The scaling is the model's own; a 400 for a model that declares none.",
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CHAT_TEMPLATE_CHARS,
        description="Jinja chat template replacing the model's own (Hugging Face's variables: messages, tools, "
        "add_generation_prompt, bos_token...); one that does not compile is a 400.",
    )
    backend: Literal["auto", "mlx", "llamacpp"] | None = Field(
        None, description="Which engine runs a GGUF for this load; omitted: IMPETUS_BACKEND."
    )
    alias: str | None = Field(
        None,
        pattern=ALIAS_PATTERN,
        description="The resident's id (llama-server's --alias): requests name it as 'model'. Omitted: the model's id.",
    )
    kv_bits: Literal[0, 4, 8] | None = Field(
        None,
        description="KV cache quantization: 0 (off, f16), 8 (q8_0: ~0.53x the KV memory) or 4 (q4_0: ~0.28x), as "
        "llama-server's -ctk/-ctv; on MLX mx.quantize groups of 64, batching on; omitted: IMPETUS_KV_BITS. A model "
        "whose KV cache cannot be quantized (e.g. head size not a multiple of 64) is a 400.",
    )


class LoadOptionsInfo(BaseModel):
    """What a resident was loaded with beyond the defaults (the template is not repeated, only whether set)."""

    context_length: int = Field(0, description="As asked at load; 0: the default (see ModelInfo.context_length).")
    rope_scaling: bool = False
    chat_template: bool = Field(False, description="Whether the load replaced the model's chat template.")
    backend: str | None = None
    alias: str | None = None
    kv_bits: int = Field(0, description="The KV cache's quantization bits in force (0: f16).")


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
    kind: Literal["language", "embedding", "rerank", "adapter"] | None = Field(
        None,
        description="language: generates (and embeds); embedding: a dedicated embedding model, /v1/embeddings only; "
        "rerank: a reranker (cross-encoder), /v1/rerank only; adapter: a LoRA adapter (load a model with it).",
    )
    vision: bool = Field(False, description="A vision-language model: its chat takes images (image_url parts).")
    path: str | None = None
    size_bytes: int | None = Field(None, description="Bytes on disk.")
    memory_bytes: int | None = Field(
        None,
        description="Bytes the registry charges for it while resident: its weights and tokenizer (a GGUF on "
        "llama.cpp: the file and the KV cache of its slots).",
    )
    compute_dtype: str | None = Field(
        None, description="A resident's dtype in memory ('as stored': its own, quantized layers quantized)."
    )
    compute_dtype_reason: str | None = Field(None, description="Why that dtype (IMPETUS_COMPUTE_DTYPE, memory).")
    context_length: int | None = Field(
        None, description="A resident's effective context length: as loaded, IMPETUS_CONTEXT_LENGTH or trained."
    )
    load_options: LoadOptionsInfo | None = Field(None, description="A resident's load options.")
    busy: bool = False
    pinned: bool = False
    keep_alive: float | None = Field(None, description="Idle seconds before unloading; null: kept loaded.")
    idle_seconds: float | None = None
    warmup: WarmupResult | None = Field(None, description="Set once a load with warmup: true has warmed it.")
    error: str | None = None
    preset: str | None = Field(None, description="The preset this resident serves under its name (/api/presets).")
    adapter: str | None = Field(None, description="The LoRA adapter applied to this resident (its name in models dir).")


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
