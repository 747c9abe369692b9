"""Tiny random LoRA adapters the tests build themselves, saved as mlx-lm's trainer saves them, and
the in-process mlx-lm reference (``mlx_lm.load(path, adapter_path=...)``) to check a server against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def build_tiny_adapter(
    out: Path, model: Path, *, rank: int = 4, scale: float = 10.0, num_layers: int = 2, seed: int = 0
) -> Path:
    """An mlx-lm adapter folder for the model folder ``model``: what ``mlx_lm.lora`` writes (its
    ``adapter_config.json`` from ``save_config``, ``adapters.safetensors`` of the trainable
    parameters, see mlx_lm/lora.py and mlx_lm/tuner/trainer.py), with ``lora_b`` set to random
    values: a fresh LoRA layer has ``lora_b = 0`` and would change nothing."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mlx_model, _ = load_model(model)
    mlx_model.freeze()  # as mlx_lm.lora does: only the LoRA parameters are trainable, and saved
    lora_parameters = {"rank": rank, "scale": scale, "dropout": 0.0}
    mx.random.seed(seed)
    linear_to_lora_layers(mlx_model, num_layers, lora_parameters)
    for _, module in mlx_model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(mlx_model.trainable_parameters())))
    config = {
        "model": str(model),
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": lora_parameters,
        "adapter_path": str(out),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return out


def reference_logprobs(model: Path, adapter: Path | None, prompt: list[int]) -> np.ndarray:
    """Log-probabilities of the token after ``prompt``, from mlx-lm itself (``mlx_lm.load`` with
    ``adapter_path``): what the server's answer must match."""
    import mlx.core as mx
    from mlx_lm import load

    mlx_model, _ = load(str(model), adapter_path=None if adapter is None else str(adapter))
    logits = mlx_model(mx.array([prompt]))[0, -1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits)
    return np.array(logprobs)


def write_gguf_lora(
    path: Path,
    *,
    n_embd: int = 576,
    layers: int = 30,
    rank: int = 4,
    alpha: float = 4.0,
    b_scale: float = 0.05,
    seed: int = 0,
    architecture: str = "llama",
) -> Path:
    """A GGUF LoRA adapter as llama.cpp's convert_lora_to_gguf.py writes one (``general.type =
    adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``), for the attention query and output
    projections (``n_embd`` x ``n_embd``) of ``layers`` blocks: ``blk.N.attn_q.weight.lora_a`` of
    ggml shape [n_embd, rank] and ``.lora_b`` [rank, n_embd], f32; llama.cpp adds
    ``alpha / rank * B(A x)``. The defaults fit the default model (SmolLM2-135M). ``b_scale`` 0: an
    adapter that changes nothing."""
    import struct

    rng = np.random.default_rng(seed)

    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    metadata = [
        ("general.architecture", 8, string(architecture)),
        ("general.type", 8, string("adapter")),
        ("adapter.type", 8, string("lora")),
        ("adapter.lora.alpha", 6, struct.pack("<f", alpha)),
    ]
    tensors: list[tuple[str, tuple[int, ...], bytes]] = []
    for block in range(layers):
        for name in ("attn_q", "attn_output"):
            a = rng.normal(0.0, 1.0 / np.sqrt(n_embd), (rank, n_embd)).astype(np.float32)  # ggml [n_embd, rank]
            b = (rng.normal(0.0, 1.0, (n_embd, rank)) * b_scale).astype(np.float32)  # ggml [rank, n_embd]
            tensors.append((f"blk.{block}.{name}.weight.lora_a", (n_embd, rank), a.tobytes()))
            tensors.append((f"blk.{block}.{name}.weight.lora_b", (rank, n_embd), b.tobytes()))
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, vtype, value in metadata:
        out += string(key) + struct.pack("<I", vtype) + value
    offset, blobs = 0, []
    for name, dims, blob in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)  # GGML_TYPE_F32
        padded = blob.ljust(-(-len(blob) // 32) * 32, b"\0")
        offset += len(padded)
        blobs.append(padded)
    out += b"\0" * (-len(out) % 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path
