"""Dedicated embedding models: BERT-family encoders (bert, roberta, xlm-roberta; nomic_bert in
encoder_nomic.py; what they share in encoder_base.py) on MLX.

A Hugging Face folder (``config.json``, safetensors, ``tokenizer.json``) and, when present,
sentence-transformers' ``modules.json`` + ``1_Pooling/config.json`` (pooling mode, Normalize)
and ``sentence_bert_config.json`` (``max_seq_length``). The layers are the field's own
(post-LayerNorm transformer, learned absolute positions), written with mlx.nn under Hugging
Face's parameter names so a checkpoint loads as it is. Runs on the engine thread.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from gerdsen_ai_server.engine.formats.cross_encoder import (
    Pooler,
    RobertaClassifier,
    activate,
    activation,
    is_cross_encoder,
)
from gerdsen_ai_server.engine.formats.encoder_base import EncoderConfig, EncoderModel, Pooling
from gerdsen_ai_server.engine.formats.encoder_nomic import NomicBertModel, NomicConfig
from gerdsen_ai_server.store.errors import ModelLoadError, UnsupportedModelFormat

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "nomic-bert")
# Embedding architectures we recognise but do not run (their layers differ: relative bias, ...).
OTHER_ENCODER_TYPES = ("distilbert", "mpnet", "modernbert", "deberta", "deberta-v2", "electra")
POOLING_MODES = ("mean", "cls", "lasttoken")
_ACTIVATIONS = {"gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx, "relu": nn.relu}


def model_type(path: Path) -> str | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return str(config.get("model_type", "")).lower().replace("_", "-") if isinstance(config, dict) else None


def is_encoder(path: Path) -> bool:
    """A folder holding a BERT-family embedding model (a language model otherwise)."""
    kind = model_type(path)
    return kind is not None and kind in ENCODER_TYPES + OTHER_ENCODER_TYPES


def is_reranker(path: Path) -> bool:
    """A folder holding a cross-encoder (cross_encoder.py): an encoder that scores pairs."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_encoder(path) and is_cross_encoder(config)


# ---- the network ------------------------------------------------------------------------------


class Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, ids: mx.array, positions: mx.array, types: mx.array | None = None) -> mx.array:
        # Token types: all 0 for one text; a cross-encoder's pair marks its second text 1 (BERT).
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        types = mx.zeros_like(ids) if types is None else types
        out: mx.array = self.LayerNorm(x + self.token_type_embeddings(types))  # unannotated in mlx.nn
        return out


class SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, t, d = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.query, self.key, self.value))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d // self.heads), mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, t, d)


class DenseNorm(nn.Module):
    """Hugging Face's ``*Output``: project, add the residual, LayerNorm (post-norm)."""

    def __init__(self, c: EncoderConfig, inputs: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        out: mx.array = self.LayerNorm(self.dense(x) + residual)  # unannotated in mlx.nn
        return out


class Attention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)


class Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class Layer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)
        self.act = _ACTIVATIONS[c.hidden_act]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention.output(self.attention.self(x, mask), x)
        return self.output(self.act(self.intermediate.dense(h)), h)


class Encoder(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = [Layer(c) for _ in range(c.num_hidden_layers)]


class BertModel(EncoderModel):
    """BERT, RoBERTa and XLM-RoBERTa: learned absolute positions, post-norm GELU layers."""

    def __init__(self, config: EncoderConfig, pooling: Pooling, matryoshka: bool = False) -> None:
        super().__init__(config, pooling, matryoshka)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def hidden_states(self, ids: mx.array, lengths: mx.array) -> mx.array:
        return self.typed_hidden_states(ids, lengths, None)

    def typed_hidden_states(self, ids: mx.array, lengths: mx.array, types: mx.array | None) -> mx.array:
        """``hidden_states`` with each token's type (segment) id; None: all 0."""
        valid = mx.arange(ids.shape[1])[None, :] < lengths[:, None]
        if self.config.roberta_positions:
            positions = mx.cumsum(valid.astype(mx.int32), axis=1) * valid + self.config.pad_token_id
        else:
            positions = mx.broadcast_to(mx.arange(ids.shape[1]), ids.shape)
        x = self.embeddings(ids, positions, types)
        mask = mx.where(valid, 0.0, -math.inf)[:, None, None, :].astype(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class CrossEncoderModel(BertModel):
    """A reranker (cross_encoder.py): a (query, document) pair in, one relevance score out, from
    the classification head on the first token's state. ``embed_batch`` is not its interface."""

    def __init__(self, config: EncoderConfig, function: str) -> None:
        super().__init__(config, Pooling(mode="cls", normalize=False, source="sequence-classification head"))
        self.function = function  # 'sigmoid' or 'identity' (cross_encoder.activation)

    def first_token_logits(self, first: mx.array) -> mx.array:
        raise NotImplementedError

    def score_batch(self, inputs: list[list[int]], segments: list[int]) -> list[float]:
        """One forward pass over pairs, right-padded to the longest; ``segments[i]``: where the
        second text's tokens (token type 1) begin in ``inputs[i]`` (BERT's type ids; a model with
        one token type gives every token type 0, as its tokenizer does)."""
        width = max(len(ids) for ids in inputs)
        pad = self.config.pad_token_id
        ids = mx.array([tokens + [pad] * (width - len(tokens)) for tokens in inputs])
        lengths = mx.array([len(tokens) for tokens in inputs])
        types = None
        if self.config.type_vocab_size > 1:
            types = (mx.arange(width)[None, :] >= mx.array(segments)[:, None]).astype(mx.int32)
        first = self.typed_hidden_states(ids, lengths, types)[:, 0].astype(mx.float32)
        scores = activate(self.first_token_logits(first).astype(mx.float32), self.function)
        return cast(list[float], scores.tolist())  # 1-D


class BertCrossEncoder(CrossEncoderModel):
    """``BertForSequenceClassification``: pooler (dense + tanh), then ``classifier``."""

    weight_prefixes = ("embeddings.", "encoder.", "pooler.", "classifier.")

    def __init__(self, config: EncoderConfig, function: str) -> None:
        super().__init__(config, function)
        self.pooler = Pooler(config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def first_token_logits(self, first: mx.array) -> mx.array:
        return self.classifier(self.pooler(first))[:, 0]


class RobertaCrossEncoder(CrossEncoderModel):
    """``(XLM)RobertaForSequenceClassification``: no pooler; classifier.dense + tanh + out_proj."""

    weight_prefixes = ("embeddings.", "encoder.", "classifier.")

    def __init__(self, config: EncoderConfig, function: str) -> None:
        super().__init__(config, function)
        self.classifier = RobertaClassifier(config.hidden_size, 1)

    def first_token_logits(self, first: mx.array) -> mx.array:
        return self.classifier(first)[:, 0]


class EncoderTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, with truncation and padding switched
    off: an over-long input must be refused, never silently cut."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._size = min(vocab_size, self._tokenizer.get_vocab_size())
        self.eos_token_ids: set[int] = set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # With special tokens: the model's [CLS] ... [SEP] (or <s> ... </s>) around the text.
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_pair(self, first: str, second: str) -> tuple[list[int], int]:
        """A cross-encoder's input: the tokenizer's own pair encoding ([CLS] a [SEP] b [SEP], or
        <s> a </s></s> b </s>), and where the second text's type-1 tokens begin (its length if none)."""
        encoding = self._tokenizer.encode(first, pair=second, add_special_tokens=True)
        types = list(encoding.type_ids)
        return list(encoding.ids), types.index(1) if 1 in types else len(types)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))

    def __len__(self) -> int:
        return self._size


# ---- loading ----------------------------------------------------------------------------------


def read_pooling(path: Path) -> Pooling:
    """sentence-transformers' module list: Transformer, then Pooling, then optionally Normalize."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return Pooling()
    modules = json.loads(modules_file.read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown:
        raise UnsupportedModelFormat(
            f"{path}: sentence-transformers modules {unknown} are not supported "
            "(Impetus runs Transformer, Pooling and Normalize)"
        )
    if "Pooling" not in kinds:
        return Pooling(normalize="Normalize" in kinds, source="modules.json without Pooling: mean")
    folder = modules[kinds.index("Pooling")].get("path") or "1_Pooling"
    if not (path / folder / "config.json").exists():
        raise UnsupportedModelFormat(
            f"{path}: modules.json names a Pooling module, but {folder}/config.json, which "
            "says how to pool, is missing; copy it from the model's repository"
        )
    config = json.loads((path / folder / "config.json").read_text())
    modes = [
        k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
        for k, v in config.items()
        if k.startswith("pooling_mode_") and v is True
    ]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise UnsupportedModelFormat(
            f"{path}: pooling {modes or 'none'} is not supported; Impetus pools one of {', '.join(POOLING_MODES)}"
        )
    return Pooling(mode=modes[0], normalize="Normalize" in kinds, source="sentence-transformers modules.json")


def supports_matryoshka(path: Path, config: dict[str, Any]) -> bool:
    """Whether the model says its leading dimensions embed on their own: ``matryoshka_dimensions``
    in config.json, or the ``matryoshka`` tag / MatryoshkaLoss in its model card."""
    if config.get("matryoshka_dimensions"):
        return True
    readme = path / "README.md"
    if not readme.exists():
        return False
    card = readme.read_text(errors="replace")
    front = card.split("---", 2)[1] if card.startswith("---") and card.count("---") >= 2 else ""
    return bool(re.search(r"^\s*-\s*matryoshka\s*$", front, re.MULTILINE | re.IGNORECASE)) or "MatryoshkaLoss" in front


def max_sequence_length(path: Path, config: EncoderConfig) -> int:
    """The fewest of what the positions allow and sentence-transformers' ``max_seq_length``."""
    limit = config.max_tokens
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        declared = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(declared, int) and declared > 0:
            limit = min(limit, declared)
    return limit


def _checkpoint_weights(path: Path, prefixes: tuple[str, ...]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))  # type: ignore[arg-type]
    kept = {}
    for name, value in weights.items():
        # BertModel saves bare names, BertFor*/RobertaFor* prefix them; the heads are not ours.
        name = re.sub(r"^(bert|roberta|model)\.", "", name)
        if name.startswith(prefixes) and not name.endswith(("position_ids", "inv_freq")):  # buffers, not weights
            kept[name] = value
    return kept


def load_encoder(path: Path, compute_dtype: str | None) -> tuple[EncoderModel, EncoderTokenizer, int]:
    """The model, its tokenizer and its maximum input length in tokens."""
    raw = json.loads((path / "config.json").read_text())
    kind = str(raw.get("model_type", "")).lower().replace("_", "-")
    if kind not in ENCODER_TYPES:
        raise UnsupportedModelFormat(
            f"{path} is a {kind} embedding model, which Impetus cannot run yet; "
            f"it runs {', '.join(ENCODER_TYPES)} encoders"
        )
    if not (path / "tokenizer.json").exists():
        raise UnsupportedModelFormat(f"{path} is an embedding model without tokenizer.json")
    try:
        model = _build(kind, raw, path)
        config = model.config
        model.load_weights(list(_checkpoint_weights(path, model.weight_prefixes).items()), strict=True)
        if compute_dtype is not None:
            model.set_dtype(getattr(mx, compute_dtype))
        mx.eval(model.parameters())
        tokenizer = EncoderTokenizer(path / "tokenizer.json", config.vocab_size)
    except ModelLoadError:
        raise
    except Exception as exc:  # bad config, missing or misshapen tensors, unreadable tokenizer
        raise ModelLoadError(f"cannot load embedding model from {path}: {type(exc).__name__}: {exc}") from exc
    return model, tokenizer, max_sequence_length(path, config)


def _build(kind: str, raw: dict[str, Any], path: Path) -> EncoderModel:
    if kind == "nomic-bert":
        return NomicBertModel(NomicConfig.from_dict(raw), read_pooling(path), supports_matryoshka(path, raw))
    config = EncoderConfig.from_dict(raw)
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"activation {config.hidden_act!r} is not supported")
    if is_cross_encoder(raw):  # a reranker: its head, not sentence-transformers' pooling
        function = activation(raw)
        return BertCrossEncoder(config, function) if kind == "bert" else RobertaCrossEncoder(config, function)
    return BertModel(config, read_pooling(path), supports_matryoshka(path, raw))
