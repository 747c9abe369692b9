"""Small random-weight llama models the tests build themselves, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tiny_llama(out: Path, tokenizer_from: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """An mlx-lm llama folder (config.json, model.safetensors, tokenizer) of random fp32 weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": hidden * 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "rope_theta": 10000.0,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out / name)
    return out


def weights_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size
