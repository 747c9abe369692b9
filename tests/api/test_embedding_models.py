"""Dedicated embedding models (tiny random BERT / XLM-R folders the test builds) served through the
loader and registry, against the real server with the openai SDK."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import bert_reference_forward as reference
from tests.support.tiny_models import build_tiny_bert

pytestmark = pytest.mark.server

BERT = "tiny-bert"  # mean pooling, normalised, Matryoshka, max_seq_length 16, tokenizer.json truncating at 8
XLMR = "tiny-xlmr"  # CLS pooling, normalised, no Matryoshka
NOMIC = "tiny-nomic"  # nomic_bert: rotary positions, SwiGLU; mean pooling, normalised, Matryoshka in config.json
TEXTS = ["the cat sat on the mat", "the dog was blue", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedding-models")
    default = default_model_folder()
    (root / DEFAULT_MODEL).symlink_to(default)
    build_tiny_bert(root / BERT, pooling="mean", normalize=True, matryoshka=True, max_seq_length=16)
    build_tiny_bert(root / XLMR, model_type="xlm-roberta", pooling="cls", normalize=True, prefix="roberta.", seed=1)
    nomic = build_tiny_bert(root / NOMIC, model_type="nomic_bert", pooling="mean", normalize=True, seed=2)
    config = json.loads((nomic / "config.json").read_text())
    (nomic / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [8, 16, 32]}))
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("embeddings"), IMPETUS_MODELS_DIR=str(models_dir))
    yield server
    stop_server(server, wait=False)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0, timeout=120)


def tokens(models_dir: Path, model: str, text: str) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(models_dir / model / "tokenizer.json"))
    tokenizer.no_truncation()
    return list(tokenizer.encode(text).ids)


def vectors(reply: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [d.index for d in reply.data] == list(range(len(reply.data)))
    return np.array([d.embedding for d in reply.data])


def test_embeddings_match_the_reference_forward(client: openai.OpenAI, models_dir: Path) -> None:
    for model, pool in ((BERT, lambda h: h.mean(0)), (XLMR, lambda h: h[0]), (NOMIC, lambda h: h.mean(0))):
        reply = client.embeddings.create(model=model, input=TEXTS)
        got = vectors(reply)
        assert got.shape == (3, 32) and reply.model == model
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        for row, text in zip(got, TEXTS, strict=True):
            want = pool(reference(models_dir / model, tokens(models_dir, model, text)))
            np.testing.assert_allclose(row, want / np.linalg.norm(want), atol=1e-5)
        assert got[0] @ got[2] == pytest.approx(1.0, abs=1e-6)  # identical texts
        assert got[0] @ got[1] < 0.999
        counted = sum(len(tokens(models_dir, model, t)) for t in TEXTS)
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == counted


def test_batch_single_token_ids_and_base64_agree(client: openai.OpenAI, models_dir: Path) -> None:
    batch = vectors(client.embeddings.create(model=BERT, input=TEXTS))
    for i, text in enumerate(TEXTS):
        single = vectors(client.embeddings.create(model=BERT, input=text))[0]
        np.testing.assert_allclose(single, batch[i], atol=1e-5)
    ids = [tokens(models_dir, BERT, t) for t in TEXTS]
    np.testing.assert_allclose(vectors(client.embeddings.create(model=BERT, input=ids)), batch, atol=1e-5)
    np.testing.assert_allclose(vectors(client.embeddings.create(model=BERT, input=ids[1]))[0], batch[1], atol=1e-5)
    b64 = client.embeddings.create(model=BERT, input=TEXTS, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data])  # type: ignore[arg-type]
    np.testing.assert_allclose(decoded, batch, atol=1e-6)


def test_matryoshka_dimensions_truncate_and_renormalise(client: openai.OpenAI) -> None:
    for model in (BERT, NOMIC):
        full = vectors(client.embeddings.create(model=model, input=TEXTS[:2]))
        short = vectors(client.embeddings.create(model=model, input=TEXTS[:2], dimensions=8))
        assert short.shape == (2, 8)
        want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(short, want, atol=1e-5)
    full = vectors(client.embeddings.create(model=BERT, input=TEXTS[:2]))
    same = vectors(client.embeddings.create(model=BERT, input=TEXTS[:2], dimensions=32))
    np.testing.assert_allclose(same, full, atol=1e-6)
    for model, dimensions in ((BERT, 33), (XLMR, 8)):  # beyond the vector; a model not trained for it
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=model, input="the cat", dimensions=dimensions)
        assert info.value.body["param"] == "dimensions"  # type: ignore[index]


def test_over_long_input_is_refused_never_truncated(client: openai.OpenAI, models_dir: Path) -> None:
    # 12 tokens: more than the 8 its tokenizer.json would truncate to, within max_seq_length 16.
    text = "the cat sat on the mat and the dog was"
    assert len(tokens(models_dir, BERT, text)) == 12
    whole = vectors(client.embeddings.create(model=BERT, input=text))[0]
    cut = vectors(client.embeddings.create(model=BERT, input=tokens(models_dir, BERT, text)[:8]))[0]
    assert whole @ cut < 0.999
    long = "the cat sat on the mat " * 3  # 20 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=BERT, input=["the cat", long])
    assert info.value.status_code == 400
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "input"  # type: ignore[index]
    assert "16" in info.value.body["message"]  # type: ignore[index]


def test_generation_on_an_embedding_model_is_a_clear_400(srv: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_supported"  # type: ignore[index]
    assert "embedding model" in info.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=XLMR, prompt="the cat", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "hi"}], stream=True)
    answer = requests.post(
        f"{srv.url}/v1/messages",
        timeout=60,
        json={"model": BERT, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 400
    warm = requests.post(f"{srv.url}/api/models/load", json={"model": XLMR, "warmup": True}, timeout=60)
    assert warm.status_code == 400 and warm.json()["error"]["param"] == "warmup"
    bench = requests.post(f"{srv.url}/api/models/{BERT}/benchmark", timeout=60)
    assert bench.status_code == 400 and bench.json()["error"]["code"] == "model_not_supported"
    # The language model next to it still generates and embeds.
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert chat.choices[0].message.content is not None
    assert len(client.embeddings.create(model=DEFAULT_MODEL, input="hi").data[0].embedding) == 576


def test_models_say_which_kind_and_the_registry_holds_them(srv: Server, client: openai.OpenAI) -> None:
    client.embeddings.create(model=BERT, input="the cat")
    client.embeddings.create(model=XLMR, input="the cat")
    cards = {m["id"]: m for m in requests.get(f"{srv.base_url}/models", timeout=30).json()["data"]}
    assert cards[BERT]["kind"] == "embedding" and cards[BERT]["capabilities"] == ["embeddings"]
    assert cards[BERT]["dimensions"] == 32 and cards[BERT]["matryoshka"] is True
    assert cards[BERT]["context_length"] == 16 and "mean pooling, L2-normalised" in cards[BERT]["embedding_method"]
    assert cards[XLMR]["matryoshka"] is False and cards[XLMR]["context_length"] == 62
    assert "cls pooling" in cards[XLMR]["embedding_method"]
    assert cards[DEFAULT_MODEL]["kind"] == "language" and "chat.completions" in cards[DEFAULT_MODEL]["capabilities"]
    assert client.models.retrieve(BERT).id == BERT
    listing = {m["id"]: m for m in requests.get(f"{srv.url}/api/models", timeout=30).json()["data"]}
    assert listing[BERT]["state"] == "resident" and listing[BERT]["memory_bytes"] > 0
    assert listing[BERT]["kind"] == "embedding" and listing[DEFAULT_MODEL]["kind"] == "language"
    unloaded = requests.post(f"{srv.url}/api/models/unload", json={"model": BERT}, timeout=60)
    assert unloaded.status_code == 200
    listing = {m["id"]: m for m in requests.get(f"{srv.url}/api/models", timeout=30).json()["data"]}
    assert listing[BERT]["state"] == "local" and listing[BERT]["kind"] == "embedding"
    assert BERT not in {m["id"] for m in requests.get(f"{srv.base_url}/models", timeout=30).json()["data"]}
    assert len(client.embeddings.create(model=BERT, input="the cat").data[0].embedding) == 32  # loads again


def test_a_large_request_goes_to_the_engine_in_pieces_and_keeps_its_order(client: openai.OpenAI) -> None:
    from gerdsen_ai_server.engine.formats.encoder_base import BATCH

    words = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue", "sky", "sea"]
    texts = [" ".join(words[(i + j * 3) % 10] for j in range(2 + i % 9)) for i in range(200)]
    reply = client.embeddings.create(model=BERT, input=texts)
    assert len(texts) > 2 * BATCH  # at least three forward passes, in the engine's slices
    pieces = np.concatenate(
        [vectors(client.embeddings.create(model=BERT, input=texts[i : i + 20])) for i in range(0, len(texts), 20)]
    )
    np.testing.assert_allclose(vectors(reply), pieces, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in pieces}) > 50  # distinct texts, distinct vectors
