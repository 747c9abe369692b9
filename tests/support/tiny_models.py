"""Small random-weight models the tests build themselves: llama (with the real SmolLM2 tokenizer)
and BERT-family embedding models (with a WordPiece tokenizer made here), plus a numpy reference
forward pass of the latter."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tiny_llama(out: Path, tokenizer_from: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """An mlx-lm llama folder (config.json, model.safetensors, tokenizer) of random fp32 weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
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


BERT_SPECIALS = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
}
BERT_WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "is", "was", "red", "blue", "sky", "sea", "and", "of"]


def build_tiny_bert(
    out: Path,
    *,
    model_type: str = "bert",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    pooling: str | None = "mean",
    normalize: bool = True,
    max_seq_length: int | None = None,
    matryoshka: bool = False,
    prefix: str = "",
    seed: int = 0,
    tokenizer_truncation: int | None = 8,
    classifier: str | None = None,
) -> Path:
    """A Hugging Face BERT-family folder of random fp32 weights under Hugging Face's own tensor
    names, a WordPiece tokenizer.json made with ``tokenizers``, and (``pooling`` not None)
    sentence-transformers' modules.json + 1_Pooling/config.json. ``tokenizer_truncation`` saves
    a truncation setting into tokenizer.json, as exported tokenizers often carry one.

    ``classifier`` (bert, roberta, xlm-roberta only) makes it a one-label cross-encoder (a
    reranker): Hugging Face's ``*ForSequenceClassification`` head, un-prefixed as they save it, and
    config.json's ``sentence_transformers.activation_fn`` set to ``classifier`` unless it is
    "default" (none declared: sigmoid)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    family = "bert" if model_type in ("bert", "nomic_bert") else "roberta"
    specials = BERT_SPECIALS[family]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab = specials + chars + [f"##{c}" for c in chars] + BERT_WORDS
    unk, cls, sep = (
        (specials[1], specials[2], specials[3]) if family == "bert" else (specials[3], specials[0], specials[2])
    )
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=unk))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1" if family == "bert" else f"{cls} $A {sep} {sep} $B {sep}",
        special_tokens=[(cls, vocab.index(cls)), (sep, vocab.index(sep))],
    )
    tokenizer.decoder = decoders.WordPiece()
    if tokenizer_truncation:
        tokenizer.enable_truncation(max_length=tokenizer_truncation)
    pad_id = vocab.index(specials[0] if family == "bert" else specials[1])
    config: dict[str, object] = {
        "model_type": model_type,
        "architectures": ["BertModel" if family == "bert" else "XLMRobertaModel"],
        "vocab_size": len(vocab),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": hidden * 4,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2 if family == "bert" else 1,
        "layer_norm_eps": 1e-12 if family == "bert" else 1e-5,
        "hidden_act": "gelu",
        "pad_token_id": pad_id,
    }
    rng = np.random.default_rng(seed)

    def normal(*shape: int, mean: float = 0.0) -> np.ndarray:
        return (mean + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": normal(len(vocab), hidden),
        "embeddings.position_embeddings.weight": normal(max_positions, hidden),
        "embeddings.token_type_embeddings.weight": normal(int(config["type_vocab_size"]), hidden),  # type: ignore[call-overload]
        "embeddings.LayerNorm.weight": normal(hidden, mean=1.0),
        "embeddings.LayerNorm.bias": normal(hidden),
        "embeddings.position_ids": np.arange(max_positions, dtype=np.int64)[None],  # HF leaves it; unused
        "pooler.dense.weight": normal(hidden, hidden),
        "pooler.dense.bias": normal(hidden),  # BertModel's head
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            tensors[f"{p}{name}.weight"], tensors[f"{p}{name}.bias"] = normal(hidden, hidden), normal(hidden)
        tensors[f"{p}intermediate.dense.weight"] = normal(hidden * 4, hidden)
        tensors[f"{p}intermediate.dense.bias"] = normal(hidden * 4)
        tensors[f"{p}output.dense.weight"], tensors[f"{p}output.dense.bias"] = (
            normal(hidden, hidden * 4),
            normal(hidden),
        )
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{p}{norm}.weight"], tensors[f"{p}{norm}.bias"] = normal(hidden, mean=1.0), normal(hidden)
    if model_type == "nomic_bert":  # rotary positions, fused QKV, SwiGLU; GPT-2-style config names
        config = {
            "model_type": "nomic_bert",
            "architectures": ["NomicBertModel"],
            "vocab_size": len(vocab),
            "n_embd": hidden,
            "n_layer": layers,
            "n_head": heads,
            "n_inner": hidden * 4,
            "n_positions": max_positions * 2,
            "max_trained_positions": max_positions,
            "type_vocab_size": 2,
            "layer_norm_epsilon": 1e-12,
            "activation_function": "swiglu",
            "rotary_emb_fraction": 1.0,
            "rotary_emb_base": 1000,
            "rotary_emb_interleaved": False,
            "qkv_proj_bias": False,
            "mlp_fc1_bias": False,
            "mlp_fc2_bias": False,
            "prenorm": False,
            "causal": False,
        }
        tensors = {
            "embeddings.word_embeddings.weight": normal(len(vocab), hidden),
            "embeddings.token_type_embeddings.weight": normal(2, hidden),
            "emb_ln.weight": normal(hidden, mean=1.0),
            "emb_ln.bias": normal(hidden),
        }
        for i in range(layers):
            p = f"encoder.layers.{i}."
            tensors |= {
                f"{p}attn.Wqkv.weight": normal(3 * hidden, hidden),
                f"{p}attn.out_proj.weight": normal(hidden, hidden),
                f"{p}mlp.fc11.weight": normal(hidden * 4, hidden),
                f"{p}mlp.fc12.weight": normal(hidden * 4, hidden),
                f"{p}mlp.fc2.weight": normal(hidden, hidden * 4),
            }
            for norm in ("norm1", "norm2"):
                tensors[f"{p}{norm}.weight"], tensors[f"{p}{norm}.bias"] = normal(hidden, mean=1.0), normal(hidden)
    heads: dict[str, np.ndarray] = {}
    if classifier is not None:
        architecture = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}
        config["architectures"] = [architecture.get(model_type, "XLMRobertaForSequenceClassification")]
        config |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        if classifier != "default":
            config["sentence_transformers"] = {"activation_fn": classifier}
        if family == "bert":
            heads = {"classifier.weight": normal(1, hidden), "classifier.bias": normal(1)}
        else:  # no pooler; its own dense + tanh + out_proj
            del tensors["pooler.dense.weight"], tensors["pooler.dense.bias"]
            heads = {
                "classifier.dense.weight": normal(hidden, hidden),
                "classifier.dense.bias": normal(hidden),
                "classifier.out_proj.weight": normal(1, hidden),
                "classifier.out_proj.bias": normal(1),
            }
    out.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in tensors.items()} | heads, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save(str(out / "tokenizer.json"))
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
        (out / "modules.json").write_text(json.dumps(modules))
        (out / "1_Pooling").mkdir(exist_ok=True)
        modes = {
            "cls": "cls_token",
            "mean": "mean_tokens",
            "max": "max_tokens",
            "mean_sqrt_len": "mean_sqrt_len_tokens",
            "weightedmean": "weightedmean_tokens",
            "lasttoken": "lasttoken",
        }
        (out / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {"word_embedding_dimension": hidden, **{f"pooling_mode_{m}": k == pooling for k, m in modes.items()}}
            )
        )
    if max_seq_length is not None:
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
        )
    if matryoshka:
        (out / "README.md").write_text("---\ntags:\n- sentence-transformers\n- matryoshka\n---\n# tiny\n")
    return out


def bert_weights(folder: Path) -> dict[str, np.ndarray]:
    """The folder's tensors as numpy arrays, under Hugging Face's names without a head prefix."""
    from safetensors.numpy import load_file

    return {
        k.removeprefix("bert.").removeprefix("roberta."): v
        for k, v in load_file(str(folder / "model.safetensors")).items()
    }


_erf = np.vectorize(math.erf)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def bert_reference_forward(folder: Path, ids: list[int], types: list[int] | None = None) -> np.ndarray:
    """Hugging Face's BertModel / XLMRobertaModel forward for one unpadded input (token types
    ``types``, all 0 if None), in float64."""
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "nomic_bert":
        return nomic_reference_forward(folder, ids)
    w = {k: v.astype(np.float64) for k, v in bert_weights(folder).items()}
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    n = len(ids)
    start = 0 if config["model_type"] == "bert" else config["pad_token_id"] + 1
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][start : start + n]
        + w["embeddings.token_type_embeddings.weight"][types or [0] * n]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)

    def linear(name: str, h: np.ndarray) -> np.ndarray:
        return h @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (
            linear(p + f"attention.self.{m}", x).reshape(n, heads, -1).transpose(1, 0, 2)
            for m in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        h = layer_norm(
            linear(p + "attention.output.dense", context) + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        inner = linear(p + "intermediate.dense", h)
        inner = 0.5 * inner * (1 + _erf(inner / math.sqrt(2)))
        x = layer_norm(
            linear(p + "output.dense", inner) + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps
        )
    return x


def cross_encoder_reference_score(folder: Path, first: str, second: str) -> float:
    """Hugging Face's ``*ForSequenceClassification`` with one label, then sentence-transformers'
    CrossEncoder activation (sigmoid unless config.json declares Identity), in float64: the pair
    as the tokenizer encodes it, with its token type ids where the model has two types."""
    from tokenizers import Tokenizer

    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    encoding = tokenizer.encode(first, pair=second)
    types = list(encoding.type_ids) if config["type_vocab_size"] > 1 else None
    first_state = bert_reference_forward(folder, list(encoding.ids), types)[0]
    w = {k: v.astype(np.float64) for k, v in bert_weights(folder).items()}
    if config["model_type"] == "bert":
        pooled = np.tanh(first_state @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
        logit = pooled @ w["classifier.weight"].T + w["classifier.bias"]
    else:
        inner = np.tanh(first_state @ w["classifier.dense.weight"].T + w["classifier.dense.bias"])
        logit = inner @ w["classifier.out_proj.weight"].T + w["classifier.out_proj.bias"]
    declared = config.get("sentence_transformers", {}).get("activation_fn", "torch.nn.modules.activation.Sigmoid")
    return float(logit[0] if declared.endswith("Identity") else 1 / (1 + np.exp(-logit[0])))


def nomic_reference_forward(folder: Path, ids: list[int]) -> np.ndarray:
    """NomicBertModel's forward (post-norm, GPT-NeoX rotary, SwiGLU) for one input, in float64."""
    config = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in bert_weights(folder).items()}
    eps, heads, n = config["layer_norm_epsilon"], config["n_head"], len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, w["emb_ln.weight"], w["emb_ln.bias"], eps)
    head = x.shape[1] // heads
    angles = np.arange(n)[:, None] * config["rotary_emb_base"] ** (-np.arange(0, head, 2) / head)[None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], 1)), np.sin(np.concatenate([angles, angles], 1))

    def rotate(a: np.ndarray) -> np.ndarray:  # (heads, n, head): x * cos + rotate_half(x) * sin
        half = head // 2
        return a * cos + np.concatenate([-a[..., half:], a[..., :half]], -1) * sin

    for i in range(config["n_layer"]):
        p = f"encoder.layers.{i}."
        q, k, v = (
            m.reshape(n, heads, head).transpose(1, 0, 2) for m in np.split(x @ w[p + "attn.Wqkv.weight"].T, 3, axis=1)
        )
        q, k = rotate(q), rotate(k)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(n, -1) @ w[p + "attn.out_proj.weight"].T
        x = layer_norm(attn + x, w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        gate = x @ w[p + "mlp.fc12.weight"].T
        mlp = ((x @ w[p + "mlp.fc11.weight"].T) * gate / (1 + np.exp(-gate))) @ w[p + "mlp.fc2.weight"].T
        x = layer_norm(mlp + x, w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
    return x


def tiny_llama_engine(tmp_path_factory: Any, name: str) -> Iterator[Any]:
    """An in-process engine (one MLX thread) with a tiny random llama called ``name`` loaded: a test module's
    own ``engine`` fixture yields from it."""
    from gerdsen_ai_server.engine.engine import InferenceEngine
    from gerdsen_ai_server.engine.options import EngineOptions
    from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR

    folder = build_tiny_llama(tmp_path_factory.mktemp(name) / name, TEST_MODELS_DIR / DEFAULT_MODEL)
    eng = InferenceEngine(EngineOptions(folder.parent, max_batch=8, max_queue=8, backend="mlx"))
    eng.start()
    eng.load_model(str(folder), trusted=True).result(timeout=120)
    yield eng
    eng.shutdown()
