"""The BERT-family encoder (engine/encoder.py) against a reference forward pass written in numpy
(tests/support/tiny_models.py) on the same random weights, and the loader's reading of a
sentence-transformers folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gerdsen_ai_server.engine.formats.encoder import EncoderModel, is_encoder, load_encoder
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.store.errors import ModelLoadError, UnsupportedModelFormat
from tests.support.tiny_models import bert_reference_forward as reference
from tests.support.tiny_models import build_tiny_bert


def pooled(hidden: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    vector = {"mean": hidden.mean(0), "cls": hidden[0], "lasttoken": hidden[-1]}[mode]
    return vector / np.linalg.norm(vector) if normalize else vector


@pytest.mark.parametrize(
    ("model_type", "mode", "normalize", "prefix"),
    [
        ("bert", "mean", True, ""),
        ("bert", "cls", False, "bert."),
        ("xlm-roberta", "lasttoken", True, "roberta."),
        ("roberta", "mean", False, ""),
        ("nomic_bert", "mean", True, ""),
    ],
)
def test_forward_matches_the_numpy_reference(
    tmp_path: Path, model_type: str, mode: str, normalize: bool, prefix: str
) -> None:
    folder = build_tiny_bert(tmp_path / "m", model_type=model_type, pooling=mode, normalize=normalize, prefix=prefix)
    model, tokenizer, _ = load_encoder(folder, "float32")
    texts = ["the cat sat on the mat", "blue", "a red dog was on the sea and the sky was blue"]
    inputs = [tokenizer.encode(t) for t in texts]
    assert len({len(i) for i in inputs}) == 3  # different lengths: the batch is padded
    got = np.array(model.embed(inputs))
    for row, ids in zip(got, inputs, strict=True):
        want = pooled(reference(folder, ids), mode, normalize)
        np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-5)
    singles = np.array([model.embed([ids])[0] for ids in inputs])
    np.testing.assert_allclose(got, singles, atol=1e-5)  # padding never leaks into a vector


def test_tokenizer_adds_special_tokens_and_never_truncates(tmp_path: Path) -> None:
    folder = build_tiny_bert(tmp_path / "m", tokenizer_truncation=4)
    _, tokenizer, max_tokens = load_encoder(folder, None)
    ids = tokenizer.encode("the cat sat on the mat and the dog")
    assert len(ids) == 11 and ids[0] == 2 and ids[-1] == 3  # [CLS] 9 words [SEP], despite truncation=4 saved
    assert max_tokens == 64


def test_loader_detects_and_describes_an_embedding_model(tmp_path: Path) -> None:
    folder = build_tiny_bert(tmp_path / "emb", pooling="cls", normalize=True, max_seq_length=16, matryoshka=True)
    assert is_encoder(folder) and LoaderFactory().detect(folder) == "mlx"
    loaded = LoaderFactory().load(str(folder), tmp_path, compute_dtype="float32", trusted=True)
    assert loaded.kind == "embedding" and isinstance(loaded.model, EncoderModel)
    assert loaded.context_length == 16  # sentence-transformers' max_seq_length beats the 64 positions
    assert loaded.model.pooling.mode == "cls" and loaded.model.pooling.normalize and loaded.model.matryoshka
    assert loaded.nbytes > 0
    roberta = LoaderFactory().load(
        str(build_tiny_bert(tmp_path / "r", model_type="xlm-roberta", pooling=None)), tmp_path, trusted=True
    )
    assert roberta.context_length == 64 - 2  # positions start after the padding index
    assert roberta.model.pooling.mode == "mean" and not roberta.model.matryoshka
    nomic = build_tiny_bert(tmp_path / "n", model_type="nomic_bert", pooling="mean")
    config = json.loads((nomic / "config.json").read_text())
    (nomic / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [8, 16, 32]}))
    loaded = LoaderFactory().load(str(nomic), tmp_path, trusted=True)
    assert loaded.kind == "embedding" and loaded.model.matryoshka and loaded.model.dimensions == 32
    assert loaded.context_length == 64  # its trained length (max_trained_positions), not n_positions (128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: (f / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True})),
            "pooling \\['max'\\] is not supported",
        ),
        (
            lambda f: (f / "modules.json").write_text(
                json.dumps(
                    [
                        {"path": "", "type": "sentence_transformers.models.Transformer"},
                        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                    ]
                )
            ),
            "Dense",
        ),
        (
            lambda f: (f / "1_Pooling" / "config.json").unlink(),
            "1_Pooling/config.json, which says how to pool, is missing",
        ),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "model_type": "distilbert"})
            ),
            "distilbert embedding model",
        ),
    ],
)
def test_unsupported_embedding_folders_are_refused_clearly(tmp_path: Path, change: Any, message: str) -> None:
    folder = build_tiny_bert(tmp_path / "m")
    change(folder)
    with pytest.raises(UnsupportedModelFormat, match=message):
        load_encoder(folder, None)


def test_missing_tensors_are_a_load_error(tmp_path: Path) -> None:
    folder = build_tiny_bert(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="cannot load embedding model"):
        load_encoder(folder, None)


def test_a_sentence_transformers_repo_pulled_from_the_hub_loads_with_its_pooling(tmp_path: Path) -> None:
    from gerdsen_ai_server.store.download import pull
    from tests.support.hub_stub import HubStub

    source = build_tiny_bert(tmp_path / "src", pooling="cls", normalize=False, matryoshka=True, max_seq_length=20)
    files = {str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    assert "1_Pooling/config.json" in files and "README.md" in files
    stub = HubStub().start()
    try:
        stub.add_repo("test/tiny-embedder", {**files, "onnx/model.onnx": b"\x08\x07"})
        folder = pull("test/tiny-embedder", tmp_path / "models", endpoint=stub.url)
    finally:
        stub.stop()
    assert not (folder / "onnx").exists()
    loaded = LoaderFactory().load(str(folder), tmp_path / "models", compute_dtype="float32", trusted=True)
    assert loaded.kind == "embedding" and loaded.context_length == 20
    assert loaded.model.pooling.mode == "cls" and not loaded.model.pooling.normalize and loaded.model.matryoshka
    ids = loaded.tokenizer.encode("the cat sat")
    np.testing.assert_allclose(loaded.model.embed([ids])[0], reference(source, ids)[0], rtol=1e-4, atol=1e-5)


PAIRS = [
    ("the cat", "the cat sat on the mat"),
    ("the cat", "blue sky"),
    ("a red dog", "the dog was red and the sea was blue"),
]


@pytest.mark.parametrize(
    ("model_type", "prefix", "classifier"),
    [
        ("bert", "bert.", "default"),  # BertForSequenceClassification: pooler + classifier, token types
        ("xlm-roberta", "roberta.", "default"),  # the bge-reranker shape: classifier.dense/out_proj, no pooler
        ("bert", "", "torch.nn.modules.linear.Identity"),  # declared raw logits
        ("roberta", "roberta.", "torch.nn.modules.activation.Sigmoid"),
    ],
)
def test_cross_encoder_scores_match_the_numpy_reference(
    tmp_path: Path, model_type: str, prefix: str, classifier: str
) -> None:
    from gerdsen_ai_server.engine.embeddings import EmbeddingJob
    from gerdsen_ai_server.engine.formats.encoder import CrossEncoderModel
    from tests.support.tiny_models import cross_encoder_reference_score

    folder = build_tiny_bert(tmp_path / "m", model_type=model_type, pooling=None, prefix=prefix, classifier=classifier)
    loaded = LoaderFactory().load(str(folder), tmp_path, compute_dtype="float32", trusted=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert isinstance(model, CrossEncoderModel) and loaded.kind == "embedding"  # an encoder: no generation
    pairs = [tokenizer.encode_pair(q, d) for q, d in PAIRS]
    assert len({len(ids) for ids, _ in pairs}) == 3  # different lengths: the batch is padded
    if model_type == "bert":
        ids, segment = pairs[0]
        assert ids[0] == 2 and ids[segment - 1] == 3 and ids[-1] == 3  # [CLS] the cat [SEP] ... [SEP]
        assert segment == 4
    job = EmbeddingJob("m", [ids for ids, _ in pairs], [segment for _, segment in pairs])
    while not job.advance(model, 1 << 20):
        pass
    got = [row[0] for row in job.vectors]
    want = [cross_encoder_reference_score(folder, q, d) for q, d in PAIRS]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if not classifier.endswith("Identity"):
        assert all(0 < score < 1 for score in got)
    singles = [model.score_batch([ids], [segment])[0] for ids, segment in pairs]
    np.testing.assert_allclose(got, singles, atol=1e-5)  # padding never leaks into a score


def test_only_one_label_classifiers_are_rerankers(tmp_path: Path) -> None:
    from gerdsen_ai_server.engine.formats.encoder import CrossEncoderModel, is_reranker

    folder = build_tiny_bert(tmp_path / "m", pooling=None, classifier="default")
    assert is_reranker(folder) and is_encoder(folder)
    assert not is_reranker(build_tiny_bert(tmp_path / "e"))  # an embedding model
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "id2label": {"0": "NO", "1": "YES"}}))
    model, _, _ = load_encoder(folder, None)
    assert not isinstance(model, CrossEncoderModel) and not is_reranker(folder)  # a classifier, loaded as before
    (folder / "config.json").write_text(
        json.dumps({**config, "sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}})
    )
    with pytest.raises(ModelLoadError, match="Tanh"):
        load_encoder(folder, None)
