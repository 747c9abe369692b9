"""Cross-encoders (rerankers): which BERT-family folders score a (query, document) pair, their
classification heads, and the activation that turns the one logit into a relevance score.

Hugging Face's ``BertForSequenceClassification`` (the ms-marco MiniLM cross-encoders): the pooler
(dense + tanh on [CLS]), then ``classifier``. ``(XLM)RobertaForSequenceClassification`` (the
bge-reranker family): no pooler; ``classifier.dense`` + tanh + ``classifier.out_proj`` on <s>.
Only one-label heads are rerankers here (a model with more labels classifies, it does not rank).

The score is the logit through sentence-transformers' CrossEncoder activation: the folder's
``sentence_transformers.activation_fn`` when config.json names one (Sigmoid or Identity), else
sigmoid for one label, as vLLM (``get_cross_encoder_act_fn``: PoolerClassify) and
sentence-transformers do, so scores lie in [0, 1] like Cohere's and Jina's; llama-server returns
the raw logit instead (the order is the same: sigmoid is monotonic).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

CLASSIFIERS = {
    "BertForSequenceClassification": "bert",
    "RobertaForSequenceClassification": "roberta",
    "XLMRobertaForSequenceClassification": "xlm-roberta",
}
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
}


def num_labels(config: dict[str, Any]) -> int:
    """Hugging Face's rule: ``id2label``'s size, else ``num_labels``, else its default of 2."""
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    value = config.get("num_labels", 2)
    return value if isinstance(value, int) else 2


def is_cross_encoder(config: dict[str, Any]) -> bool:
    """A one-label sequence classifier over a BERT, RoBERTa or XLM-RoBERTa body: a reranker."""
    architectures = config.get("architectures") or []
    kind = str(config.get("model_type", "")).lower().replace("_", "-")
    return (
        isinstance(architectures, list)
        and any(CLASSIFIERS.get(str(name)) == kind for name in architectures)
        and num_labels(config) == 1
    )


def activation(config: dict[str, Any]) -> str:
    """'sigmoid' or 'identity': what the folder declares (sentence-transformers v4 saves it in
    config.json; older versions as ``sbert_ce_default_activation_function``), else sigmoid."""
    declared = (config.get("sentence_transformers") or {}).get("activation_fn") or config.get(
        "sbert_ce_default_activation_function"
    )
    if declared is None:
        return "sigmoid"
    if declared not in ACTIVATIONS:
        raise ValueError(f"the cross-encoder activation {declared!r} is not supported (Sigmoid or Identity are)")
    return ACTIVATIONS[declared]


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the [CLS] state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # mlx.nn.Module is unannotated
        self.dense = nn.Linear(hidden, hidden)

    def __call__(self, first: mx.array) -> mx.array:
        return mx.tanh(self.dense(first))


class RobertaClassifier(nn.Module):
    """RoBERTa's classification head: dense + tanh + out_proj on the <s> state."""

    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # mlx.nn.Module is unannotated
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, labels)

    def __call__(self, first: mx.array) -> mx.array:
        out: mx.array = self.out_proj(mx.tanh(self.dense(first)))  # unannotated in mlx.nn
        return out


def activate(logits: mx.array, function: str) -> mx.array:
    return mx.sigmoid(logits) if function == "sigmoid" else logits
