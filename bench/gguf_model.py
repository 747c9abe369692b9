"""The bench model as a GGUF file, for the llama.cpp rows: the same weights, upcast to float32.

    python -m bench.gguf_model [--folder build/bench-model] [--out build/bench-model-f32.gguf]

Written with MLX's own GGUF writer (``mx.save_gguf``; no extra dependency): llama.cpp's tensor
names and q/k row order (mlx-lm's ``permute_weights``, as llama.cpp's converter does), the llama
hyper-parameters, and the tokenizer as byte-level BPE ("gpt2": vocabulary, merges, token types,
SmolLM2's pre-tokenizer, end token and chat template), which llama.cpp, and our backend's
tokenizer rebuild, read back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CONTROL, _NORMAL = 3, 1


def default_out(folder: Path) -> Path:
    return folder.with_name(folder.name + "-f32.gguf")


def _float32_weights(folder: Path, config: dict) -> dict:
    """The folder's weights in float32; quantized layers (e.g. the converted default model) dequantized."""
    import mlx.core as mx

    if not config.get("quantization"):
        return {k: v.astype(mx.float32) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    model, _ = load_model(folder)
    dequantize_model(model)
    return {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}


def write_gguf(folder: Path, out: Path | None = None) -> Path:
    """``folder`` (an MLX llama folder from bench.model) as an f32 GGUF; rebuilt when the folder changed."""
    import mlx.core as mx
    from mlx_lm.gguf import permute_weights, translate_weight_names

    folder = Path(folder)
    out = Path(out) if out else default_out(folder)
    stamp = out.with_suffix(".json")
    marker = folder / "bench-model.json" if (folder / "bench-model.json").exists() else folder / "model.safetensors"
    source_stamp = marker.read_text() if marker.name.endswith(".json") else str(marker.stat().st_mtime_ns)
    if out.is_file() and stamp.is_file() and stamp.read_text() == source_stamp:
        return out
    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    weights = {}
    for name, value in _float32_weights(folder, config).items():
        if "self_attn.q_proj.weight" in name:
            value = permute_weights(value, heads, heads)
        elif "self_attn.k_proj.weight" in name:
            value = permute_weights(value, heads, kv_heads)
        weights[translate_weight_names(name)] = value
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos

    def u32(x: int) -> mx.array:
        return mx.array(x, dtype=mx.uint32)

    hidden = config["hidden_size"]
    metadata = {
        "general.architecture": "llama",
        "general.name": folder.name,
        "general.alignment": u32(32),
        "general.file_type": u32(0),  # all f32
        "llama.context_length": u32(config["max_position_embeddings"]),
        "llama.embedding_length": u32(hidden),
        "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.rope.dimension_count": u32(hidden // heads),
        "llama.attention.head_count": u32(heads),
        "llama.attention.head_count_kv": u32(kv_heads),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config.get("rms_norm_eps", 1e-5), dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config.get("rope_theta", 10000.0), dtype=mx.float32),
        "llama.vocab_size": u32(len(tokens)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(
            [_CONTROL if i in special else _NORMAL for i in range(len(tokens))], dtype=mx.int32
        ),
        "tokenizer.ggml.bos_token_id": u32(config.get("bos_token_id", 1)),
        "tokenizer.ggml.eos_token_id": u32(eos),
        "tokenizer.ggml.add_bos_token": mx.array(False),
    }
    if tok_config.get("chat_template"):
        metadata["tokenizer.chat_template"] = tok_config["chat_template"]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.gguf")
    mx.save_gguf(str(partial), weights, metadata)
    partial.rename(out)
    stamp.write_text(source_stamp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "build" / "bench-model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    print(write_gguf(args.folder, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
