"""Models worth pulling: a curated catalogue of real mlx-community repos, and memory estimates.

The catalogue is what ``/api/models/discover`` offers when the hub cannot be searched. Sizes are
approximate bytes on disk; ``memory_bytes`` is what the registry will charge against the memory
budget, which depends on the compute dtype: quantized weights dequantized to float32 on CPU take
4 bytes per parameter, on a GPU they stay as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gerdsen_ai_server.store.formats import SAFETENSORS_DTYPE_BYTES


@dataclass(frozen=True)
class CatalogueModel:
    id: str
    parameters: int
    quantization: str  # "4bit", "8bit", "bf16"
    size_bytes: int  # approximate, on disk
    description: str


CATALOGUE: tuple[CatalogueModel, ...] = (
    CatalogueModel(
        "mlx-community/SmolLM2-135M-Instruct",
        135_000_000,
        "bf16",
        270_000_000,
        "SmolLM2 135M: tiny and fast; quick tasks and testing",
    ),
    CatalogueModel(
        "mlx-community/SmolLM2-360M-Instruct", 362_000_000, "bf16", 725_000_000, "SmolLM2 360M: small general chat"
    ),
    CatalogueModel(
        "mlx-community/SmolLM2-1.7B-Instruct-4bit",
        1_710_000_000,
        "4bit",
        960_000_000,
        "SmolLM2 1.7B: the strongest SmolLM2",
    ),
    CatalogueModel(
        "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        494_000_000,
        "4bit",
        278_000_000,
        "Qwen2.5 0.5B: multilingual, small",
    ),
    CatalogueModel(
        "mlx-community/Qwen2.5-1.5B-Instruct-4bit",
        1_540_000_000,
        "4bit",
        870_000_000,
        "Qwen2.5 1.5B: multilingual, good tool use for its size",
    ),
    CatalogueModel(
        "mlx-community/Qwen2.5-3B-Instruct-4bit",
        3_090_000_000,
        "4bit",
        1_740_000_000,
        "Qwen2.5 3B: balanced quality and speed",
    ),
    CatalogueModel(
        "mlx-community/Llama-3.2-1B-Instruct-4bit",
        1_240_000_000,
        "4bit",
        700_000_000,
        "Llama 3.2 1B: small, 128k context",
    ),
    CatalogueModel(
        "mlx-community/Llama-3.2-3B-Instruct-4bit",
        3_210_000_000,
        "4bit",
        1_810_000_000,
        "Llama 3.2 3B: general chat, 128k context",
    ),
    CatalogueModel(
        "mlx-community/gemma-2-2b-it-4bit",
        2_610_000_000,
        "4bit",
        1_490_000_000,
        "Gemma 2 2B: Google's small instruction model",
    ),
    CatalogueModel(
        "mlx-community/Phi-3.5-mini-instruct-4bit",
        3_820_000_000,
        "4bit",
        2_150_000_000,
        "Phi-3.5 mini: reasoning and code, 128k context",
    ),
    CatalogueModel(
        "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
        7_250_000_000,
        "4bit",
        4_080_000_000,
        "Mistral 7B v0.3: strong general 7B, function calling",
    ),
    CatalogueModel(
        "mlx-community/Qwen2.5-7B-Instruct-4bit",
        7_620_000_000,
        "4bit",
        4_280_000_000,
        "Qwen2.5 7B: strong multilingual 7B",
    ),
    CatalogueModel(
        "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        8_030_000_000,
        "4bit",
        4_520_000_000,
        "Llama 3.1 8B: strong general 8B, 128k context",
    ),
)

_QUANT = re.compile(r"(?<![0-9])([2-8])[-_]?bits?\b|\b(bf16|fp16|f16|fp32|f32)\b", re.IGNORECASE)


def quantization_from_name(repo_id: str) -> str | None:
    """'4bit', 'bf16', ... as mlx-community names say it; None when the name does not."""
    match = _QUANT.search(repo_id.split("/")[-1])
    if match is None:
        return None
    return f"{match.group(1)}bit" if match.group(1) else match.group(2).lower()


def memory_bytes(parameters: int | None, size_bytes: int | None, compute_dtype: str | None) -> int | None:
    """Bytes the registry will count for the model (as ``LoaderFactory.estimate_bytes`` in engine/formats/loaders.py does):
    4 per parameter when dequantized to float32, otherwise as stored."""
    if compute_dtype == "float32" and parameters:
        return parameters * 4
    return size_bytes


def from_safetensors_info(repo_id: str, parameters_by_dtype: dict[str, int] | None) -> tuple[int | None, int | None]:
    """(parameters, bytes on disk) from the hub's safetensors summary {dtype: count}.

    MLX quantized weights are U32 words packing 32/bits parameters each.
    """
    if not parameters_by_dtype:
        return None, None
    quant = quantization_from_name(repo_id) or ""
    bits = int(quant[:-3]) if quant.endswith("bit") else 4
    stored = sum(count * SAFETENSORS_DTYPE_BYTES.get(dtype, 4) for dtype, count in parameters_by_dtype.items())
    params = sum(count * (32 // bits) if dtype == "U32" else count for dtype, count in parameters_by_dtype.items())
    return params, stored


def describe(model: CatalogueModel, compute_dtype: str | None, budget_bytes: int) -> dict[str, Any]:
    memory = memory_bytes(model.parameters, model.size_bytes, compute_dtype)
    return {
        "id": model.id,
        "source": "catalogue",
        "description": model.description,
        "parameters": model.parameters,
        "quantization": model.quantization,
        "size_bytes": model.size_bytes,
        "memory_bytes": memory,
        "fits": memory is not None and memory <= budget_bytes,
    }


def search_catalogue(query: str | None) -> list[CatalogueModel]:
    words = (query or "").lower().split()
    return [m for m in CATALOGUE if all(w in f"{m.id} {m.description}".lower() for w in words)]
