"""A tiny random GGUF vision model for llama.cpp: a llama text GGUF plus its multimodal projector
(``mmproj``), LLaVA-1.5's layout (a CLIP ViT and the ``mlp`` projector: ``mm.0`` and ``mm.2`` linear
layers with GELU between), as llama.cpp's convert_image_encoder_to_gguf.py writes it.

Both files are written with MLX's own GGUF writer (``mx.save_gguf``, as bench/gguf_model.py writes
the text model): typed metadata and n-D tensors, which tests/support/gguf.py's minimal writer does
not do. A 32x32 image in 8-pixel patches is 16 image tokens; the whole projector is ~100 KB and
libmtmd loads it in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
PATCH = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # LLaVA drops the class token: one token per patch
MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's, as llava-1.5's preprocessor has them
STD = [0.26862954, 0.26130258, 0.27577711]


def write_mmproj(path: Path, text_embd: int, *, embd: int = 32, blocks: int = 1, heads: int = 4, seed: int = 0) -> Path:
    """A LLaVA-1.5 projector GGUF (``general.architecture = clip``, ``clip.projector_type = mlp``)
    of random f32 weights whose output width is the text model's ``text_embd``."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    ff = embd * 2
    n_pos = IMAGE_TOKENS + 1  # the class token's position too

    def w(*shape: int, scale: float = 0.0) -> mx.array:
        std = scale or 1.0 / np.sqrt(shape[-1])
        return mx.array(rng.normal(0.0, std, shape).astype(np.float32))

    def ones(n: int) -> mx.array:
        return mx.array(np.ones(n, np.float32))

    def zeros(n: int) -> mx.array:
        return mx.array(np.zeros(n, np.float32))

    tensors: dict[str, mx.array] = {
        "v.class_embd": w(embd, scale=0.02),
        "v.patch_embd.weight": w(embd, 3, PATCH, PATCH, scale=0.05),  # ggml [PATCH, PATCH, 3, embd]
        "v.position_embd.weight": w(n_pos, embd, scale=0.02),
        "v.pre_ln.weight": ones(embd),
        "v.pre_ln.bias": zeros(embd),
        "mm.0.weight": w(text_embd, embd),
        "mm.0.bias": zeros(text_embd),
        "mm.2.weight": w(text_embd, text_embd),
        "mm.2.bias": zeros(text_embd),
    }
    for i in range(blocks):
        p = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{p}.{name}.weight"] = w(embd, embd)
            tensors[f"{p}.{name}.bias"] = zeros(embd)
        for name in ("ln1", "ln2"):
            tensors[f"{p}.{name}.weight"] = ones(embd)
            tensors[f"{p}.{name}.bias"] = zeros(embd)
        tensors[f"{p}.ffn_up.weight"] = w(ff, embd)
        tensors[f"{p}.ffn_up.bias"] = zeros(ff)
        tensors[f"{p}.ffn_down.weight"] = w(embd, ff)
        tensors[f"{p}.ffn_down.bias"] = zeros(embd)

    def u32(x: int) -> mx.array:
        return mx.array(x, dtype=mx.uint32)

    metadata = {
        "general.architecture": "clip",
        "general.name": "tiny-llava-mmproj",
        "general.file_type": u32(0),
        "clip.has_text_encoder": mx.array(False),
        "clip.has_vision_encoder": mx.array(True),
        "clip.has_llava_projector": mx.array(True),
        "clip.projector_type": "mlp",
        "clip.use_gelu": mx.array(True),
        "clip.vision.image_size": u32(IMAGE_SIZE),
        "clip.vision.patch_size": u32(PATCH),
        "clip.vision.embedding_length": u32(embd),
        "clip.vision.feed_forward_length": u32(ff),
        "clip.vision.projection_dim": u32(text_embd),
        "clip.vision.block_count": u32(blocks),
        "clip.vision.attention.head_count": u32(heads),
        "clip.vision.attention.layer_norm_epsilon": mx.array(1e-5, dtype=mx.float32),
        "clip.vision.image_mean": mx.array(MEAN, dtype=mx.float32),
        "clip.vision.image_std": mx.array(STD, dtype=mx.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_gguf(str(path), tensors, metadata)
    return path


def build_tiny_llava(folder: Path, tokenizer_from: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """``folder`` holding ``tiny-llava-f32.gguf`` (a random 2-layer llama, 64 wide, with SmolLM2's
    tokenizer and chat template) and ``mmproj-tiny-llava-f32.gguf`` beside it, as LM Studio and
    Ollama-style folders pair them; built once (a stamp), returns (model, mmproj)."""
    from tests.support.gguf import build_tiny_gguf
    from tests.support.models import cache_lock

    model, mmproj = folder / "tiny-llava-f32.gguf", folder / "mmproj-tiny-llava-f32.gguf"
    stamp = folder.parent / f".{folder.name}.json"
    want = json.dumps({"seed": seed, "image": IMAGE_SIZE, "patch": PATCH, "v": 1})
    with cache_lock(f"llava-{folder.name}"):  # another xdist worker may be building it
        if model.is_file() and mmproj.is_file() and stamp.is_file() and stamp.read_text() == want:
            return model, mmproj
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_gguf(model, tokenizer_from, seed=seed)
        write_mmproj(mmproj, 64, seed=seed)  # build_tiny_gguf's width
        stamp.write_text(want)
    return model, mmproj
