"""Models worth pulling: a curated catalogue of real mlx-community repos (and each one's GGUF), and memory estimates.

The catalogue is what ``/api/models/discover`` offers when the hub cannot be searched. Each entry is an
MLX repo (mlx-community's conversion) and, where llama.cpp publishes one, the GGUF build of the same
model at Q4_K_M (bartowski's or the vendor's repo, with its file name): on a CPU (Linux) llama.cpp
keeps those weights quantized and decodes faster than MLX (engine/backends/choice.py), so the
discover answer puts the GGUF beside the MLX repo there, marked as the faster choice. Sizes are
approximate bytes on disk; ``kv_elements`` (K and V elements per token over all layers, from each
model's config) and ``context`` (its trained context) let the server say what the KV cache takes.
What a model will take resident depends on the dtype it computes in here (engine/dtype.py), which
serving/discover.py works out per entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gerdsen_ai_server.store.formats import SAFETENSORS_DTYPE_BYTES


@dataclass(frozen=True)
class GgufBuild:
    """The GGUF of a catalogue model: the repo, the file to pull (``impetus pull REPO --file FILE``), its size."""

    repo: str
    file: str
    size_bytes: int
    projector_bytes: int = 0  # a vision model's mmproj file, pulled beside it (store/hub.py)


@dataclass(frozen=True)
class CatalogueModel:
    id: str
    parameters: int
    quantization: str  # "4bit", "8bit", "bf16"
    size_bytes: int  # approximate, on disk
    description: str
    context: int = 32768  # trained context, tokens
    kv_elements: int = 0  # K + V elements one token takes over all layers (2 x layers x kv heads x head dim)
    gguf: GgufBuild | None = None
    vision: bool = False  # a vision-language model: its chat takes images (issue 30)


def _kv(layers: int, kv_heads: int, head_dim: int) -> int:
    return 2 * layers * kv_heads * head_dim


CATALOGUE: tuple[CatalogueModel, ...] = (
    CatalogueModel(
        "mlx-community/SmolLM2-135M-Instruct",
        135_000_000,
        "bf16",
        270_000_000,
        "SmolLM2 135M: tiny and fast; quick tasks and testing",
        8192,
        _kv(30, 3, 64),
    ),
    CatalogueModel(
        "mlx-community/SmolLM2-1.7B-Instruct-4bit",
        1_710_000_000,
        "4bit",
        960_000_000,
        "SmolLM2 1.7B: the strongest SmolLM2",
        8192,
        _kv(24, 32, 64),
        GgufBuild("bartowski/SmolLM2-1.7B-Instruct-GGUF", "SmolLM2-1.7B-Instruct-Q4_K_M.gguf", 1_060_000_000),
    ),
    CatalogueModel(
        "mlx-community/SmolLM3-3B-4bit",
        3_080_000_000,
        "4bit",
        1_730_000_000,
        "SmolLM3 3B: reasoning (think / no_think), multilingual, 64k context",
        65536,
        _kv(36, 4, 128),
        GgufBuild("bartowski/HuggingFaceTB_SmolLM3-3B-GGUF", "HuggingFaceTB_SmolLM3-3B-Q4_K_M.gguf", 1_920_000_000),
    ),
    CatalogueModel(
        "mlx-community/Qwen3-0.6B-4bit",
        596_000_000,
        "4bit",
        340_000_000,
        "Qwen3 0.6B: thinking and tool use in a small model",
        40960,
        _kv(28, 8, 128),
        GgufBuild("bartowski/Qwen_Qwen3-0.6B-GGUF", "Qwen_Qwen3-0.6B-Q4_K_M.gguf", 484_000_000),
    ),
    CatalogueModel(
        "mlx-community/Qwen3-1.7B-4bit",
        1_720_000_000,
        "4bit",
        970_000_000,
        "Qwen3 1.7B: thinking, tool use, multilingual",
        40960,
        _kv(28, 8, 128),
        GgufBuild("bartowski/Qwen_Qwen3-1.7B-GGUF", "Qwen_Qwen3-1.7B-Q4_K_M.gguf", 1_280_000_000),
    ),
    CatalogueModel(
        "mlx-community/Qwen3-4B-4bit",
        4_020_000_000,
        "4bit",
        2_260_000_000,
        "Qwen3 4B: strong reasoning and agent use for its size",
        40960,
        _kv(36, 8, 128),
        GgufBuild("bartowski/Qwen_Qwen3-4B-GGUF", "Qwen_Qwen3-4B-Q4_K_M.gguf", 2_500_000_000),
    ),
    CatalogueModel(
        "mlx-community/Qwen3-8B-4bit",
        8_190_000_000,
        "4bit",
        4_620_000_000,
        "Qwen3 8B: the strongest Qwen3 that fits a 16 GB machine",
        40960,
        _kv(36, 8, 128),
        GgufBuild("bartowski/Qwen_Qwen3-8B-GGUF", "Qwen_Qwen3-8B-Q4_K_M.gguf", 5_030_000_000),
    ),
    CatalogueModel(
        "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        494_000_000,
        "4bit",
        278_000_000,
        "Qwen2.5 0.5B: multilingual, small",
        32768,
        _kv(24, 2, 64),
        GgufBuild("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", 491_000_000),
    ),
    CatalogueModel(
        "mlx-community/Qwen2.5-7B-Instruct-4bit",
        7_620_000_000,
        "4bit",
        4_280_000_000,
        "Qwen2.5 7B: strong multilingual 7B",
        32768,
        _kv(28, 4, 128),
        GgufBuild("bartowski/Qwen2.5-7B-Instruct-GGUF", "Qwen2.5-7B-Instruct-Q4_K_M.gguf", 4_680_000_000),
    ),
    CatalogueModel(
        "mlx-community/Llama-3.2-1B-Instruct-4bit",
        1_240_000_000,
        "4bit",
        700_000_000,
        "Llama 3.2 1B: small, 128k context",
        131072,
        _kv(16, 8, 64),
        GgufBuild("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf", 808_000_000),
    ),
    CatalogueModel(
        "mlx-community/Llama-3.2-3B-Instruct-4bit",
        3_210_000_000,
        "4bit",
        1_810_000_000,
        "Llama 3.2 3B: general chat, 128k context",
        131072,
        _kv(28, 8, 128),
        GgufBuild("bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-Q4_K_M.gguf", 2_020_000_000),
    ),
    CatalogueModel(
        "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        8_030_000_000,
        "4bit",
        4_520_000_000,
        "Llama 3.1 8B: strong general 8B, 128k context",
        131072,
        _kv(32, 8, 128),
        GgufBuild("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", 4_920_000_000),
    ),
    CatalogueModel(
        "mlx-community/gemma-3-1b-it-4bit",
        1_000_000_000,
        "4bit",
        730_000_000,
        "Gemma 3 1B: Google's small instruction model, 32k context",
        32768,
        _kv(26, 1, 256),
        GgufBuild("bartowski/google_gemma-3-1b-it-GGUF", "google_gemma-3-1b-it-Q4_K_M.gguf", 806_000_000),
    ),
    CatalogueModel(
        "mlx-community/Phi-4-mini-instruct-4bit",
        3_840_000_000,
        "4bit",
        2_160_000_000,
        "Phi-4 mini: reasoning, math and code, function calling, 128k context",
        131072,
        _kv(32, 8, 128),
        GgufBuild(
            "bartowski/microsoft_Phi-4-mini-instruct-GGUF", "microsoft_Phi-4-mini-instruct-Q4_K_M.gguf", 2_490_000_000
        ),
    ),
    CatalogueModel(
        "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
        7_250_000_000,
        "4bit",
        4_080_000_000,
        "Mistral 7B v0.3: strong general 7B, function calling",
        32768,
        _kv(32, 8, 128),
        GgufBuild("bartowski/Mistral-7B-Instruct-v0.3-GGUF", "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf", 4_370_000_000),
    ),
    # Vision-language models (mlx-vlm on MLX; a GGUF with its mmproj projector on llama.cpp: docs/vision.md).
    CatalogueModel(
        "mlx-community/Qwen2-VL-2B-Instruct-4bit",
        2_210_000_000,
        "4bit",
        1_250_000_000,
        "Qwen2-VL 2B: images in (vision), the family Impetus tests against mlx-vlm",
        32768,
        _kv(28, 2, 128),
        vision=True,
    ),
    CatalogueModel(
        "mlx-community/gemma-3-4b-it-4bit",
        4_300_000_000,
        "4bit",
        3_000_000_000,
        "Gemma 3 4B: images in (vision), 128k context",
        131072,
        _kv(34, 4, 256),
        GgufBuild(
            "bartowski/google_gemma-3-4b-it-GGUF", "google_gemma-3-4b-it-Q4_K_M.gguf", 2_490_000_000, 851_000_000
        ),
        vision=True,
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
    4 per parameter when dequantized to float32; quantized weights kept with float32 scales and biases
    ('quantized-float32', engine/dtype.py) add 2 x 2 bytes per group of 64 (1/16 byte a parameter) to
    the stored size; otherwise as stored."""
    if compute_dtype == "float32" and parameters:
        return parameters * 4
    if compute_dtype == "quantized-float32" and parameters and size_bytes:
        return size_bytes + parameters // 16
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


def search_catalogue(query: str | None) -> list[CatalogueModel]:
    words = (query or "").lower().split()
    return [
        m
        for m in CATALOGUE
        if all(w in f"{m.id} {m.description} {m.gguf.repo if m.gguf else ''}".lower() for w in words)
    ]
