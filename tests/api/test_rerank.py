"""Rerank (/v1/rerank, /rerank, /v1/reranking) on the real server, with API keys set, through plain
HTTP as Cohere-style clients send it (no SDK has rerank): tiny random cross-encoders the test builds
(BERT's sequence-classification head with token types, XLM-R's bge-reranker head), their scores
against a numpy reference forward, and the 400s for what a reranker cannot do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_bert, cross_encoder_reference_score

pytestmark = pytest.mark.server

KEY = "sk-rerank-test-0123456789abcdef"
BERT = "tiny-ms-marco"  # BertForSequenceClassification, Sigmoid declared, 64 positions
XLMR = "tiny-bge-reranker"  # XLMRobertaForSequenceClassification, no activation declared (sigmoid), 62 tokens
EMBEDDER = "tiny-embedder"  # a BERT embedding model: not a reranker
QUERY = "the cat sat"
DOCUMENTS = ["the cat sat on the mat", "blue sky and blue sea", "a red dog", "the cat was on the mat and the dog sat"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rerank-models")
    (root / DEFAULT_MODEL).symlink_to(default_model_folder())
    build_tiny_bert(root / BERT, pooling=None, prefix="bert.", classifier="torch.nn.modules.activation.Sigmoid", seed=3)
    build_tiny_bert(
        root / XLMR, model_type="xlm-roberta", pooling=None, prefix="roberta.", classifier="default", seed=4
    )
    build_tiny_bert(root / EMBEDDER, pooling="mean")
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("rerank"),
        IMPETUS_MODELS_DIR=str(models_dir),
        IMPETUS_API_KEYS=KEY,
        IMPETUS_MAX_REQUEST_TOKENS="3000",
    )
    yield server
    stop_server(server, wait=False)


def rerank(srv: Server, body: dict[str, Any], path: str = "/v1/rerank") -> requests.Response:
    return requests.post(f"{srv.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def ok(srv: Server, body: dict[str, Any], path: str = "/v1/rerank") -> dict[str, Any]:
    answer = rerank(srv, body, path)
    assert answer.status_code == 200, answer.text
    reply: dict[str, Any] = answer.json()
    return reply


def error(srv: Server, body: dict[str, Any], path: str = "/v1/rerank") -> dict[str, Any]:
    answer = rerank(srv, body, path)
    assert answer.status_code == 400, answer.text
    found: dict[str, Any] = answer.json()["error"]
    return found


def pair_tokens(models_dir: Path, model: str, query: str, document: str) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(models_dir / model / "tokenizer.json"))
    tokenizer.no_truncation()  # the saved tokenizer.json truncates at 8: the server must not
    return len(tokenizer.encode(query, pair=document).ids)


def test_scores_match_the_reference_forward_sorted_with_usage(srv: Server, models_dir: Path) -> None:
    for model in (BERT, XLMR):
        reply = ok(srv, {"model": model, "query": QUERY, "documents": DOCUMENTS})
        assert reply["model"] == model and reply["id"].startswith("rerank-") and reply["object"] == "list"
        results = reply["results"]
        assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True)  # the most relevant first
        want = {i: cross_encoder_reference_score(models_dir / model, QUERY, d) for i, d in enumerate(DOCUMENTS)}
        for result in results:
            assert result["relevance_score"] == pytest.approx(want[result["index"]], abs=1e-5)
            assert 0 < result["relevance_score"] < 1 and "document" not in result  # sigmoid; not asked for
        assert len({round(s, 4) for s in scores}) == len(DOCUMENTS)  # distinct pairs, distinct scores
        counted = sum(pair_tokens(models_dir, model, QUERY, d) for d in DOCUMENTS)
        assert counted > 8 * len(DOCUMENTS)  # longer than the tokenizer.json's saved truncation
        assert reply["usage"] == {"prompt_tokens": counted, "total_tokens": counted}


def test_top_n_return_documents_objects_and_the_aliases(srv: Server) -> None:
    full = ok(srv, {"model": BERT, "query": QUERY, "documents": DOCUMENTS})["results"]
    top = ok(srv, {"model": BERT, "query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": True})
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full[:2]]
    assert [r["document"] for r in top["results"]] == [{"text": DOCUMENTS[r["index"]]} for r in full[:2]]
    assert top["usage"]["total_tokens"] > 0
    beyond = ok(srv, {"model": BERT, "query": QUERY, "documents": DOCUMENTS, "top_n": 50})["results"]
    assert len(beyond) == len(DOCUMENTS)  # bounded by the documents
    objects = [{"text": d} for d in DOCUMENTS[:2]] + DOCUMENTS[2:]  # Jina's and Cohere v1's form, mixed
    for path in ("/rerank", "/v1/reranking"):
        same = ok(srv, {"model": BERT, "query": QUERY, "documents": objects}, path)["results"]
        assert [r["index"] for r in same] == [r["index"] for r in full]
        np.testing.assert_allclose(
            [r["relevance_score"] for r in same], [r["relevance_score"] for r in full], atol=1e-6
        )


def test_many_documents_go_in_slices_and_keep_their_scores(srv: Server, models_dir: Path) -> None:
    words = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue", "sky", "sea"]
    documents = [" ".join(words[(i + j * 3) % 10] for j in range(2 + i % 9)) for i in range(90)]  # > 2 batches
    results = ok(srv, {"model": XLMR, "query": QUERY, "documents": documents})["results"]
    got = {r["index"]: r["relevance_score"] for r in results}
    for i in range(0, 90, 7):
        assert got[i] == pytest.approx(cross_encoder_reference_score(models_dir / XLMR, QUERY, documents[i]), abs=1e-5)


def test_bad_requests_are_clear_400s(srv: Server) -> None:
    assert error(srv, {"model": BERT, "query": QUERY, "documents": []})["param"] == "documents"
    many = error(srv, {"model": BERT, "query": QUERY, "documents": ["a"] * 1001})
    assert many["param"] == "documents" and "1000" in many["message"]
    long = error(srv, {"model": BERT, "query": QUERY, "documents": ["short", "the cat " * 40]})
    assert long["code"] == "context_length_exceeded" and long["param"] == "documents"
    assert "document 1" in long["message"] and "64" in long["message"]  # refused, never truncated
    over = error(srv, {"model": BERT, "query": QUERY, "documents": ["the cat sat on the mat"] * 300})
    assert over["param"] == "documents" and "IMPETUS_MAX_REQUEST_TOKENS" in over["message"]
    assert error(srv, {"model": BERT, "query": QUERY, "documents": ["a"], "top_n": 0})["param"] == "top_n"
    unknown = error(srv, {"model": BERT, "query": QUERY, "documents": ["a"], "max_chunks_per_doc": 2})
    assert unknown["code"] == "unknown_parameter" and unknown["param"] == "max_chunks_per_doc"
    assert error(srv, {"model": BERT, "documents": ["a"]})["param"] == "query"
    shaped = error(srv, {"model": BERT, "query": QUERY, "documents": ["a", {"text": "b", "title": "c"}]})
    assert shaped["param"] == "documents" and "document 1 is neither a string nor" in shaped["message"]
    for model in (DEFAULT_MODEL, EMBEDDER):  # a language model, an embedding model: not rerankers
        refused = error(srv, {"model": model, "query": QUERY, "documents": ["a"]})
        assert refused["code"] == "model_not_supported" and refused["param"] == "model"
        assert "not a reranker" in refused["message"]


def test_a_reranker_serves_nothing_else_and_says_what_it_is(srv: Server) -> None:
    client = openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=XLMR, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.body["code"] == "model_not_supported" and "reranker" in info.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=BERT, input="the cat")
    assert info.value.body["code"] == "model_not_supported" and "/v1/rerank only" in info.value.body["message"]  # type: ignore[index]
    assert len(client.embeddings.create(model=EMBEDDER, input="the cat").data[0].embedding) == 32  # still embeds
    ok(srv, {"model": BERT, "query": QUERY, "documents": ["a"]})
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards[BERT]["kind"] == "rerank" and cards[BERT]["capabilities"] == ["rerank"]
    assert cards[BERT]["context_length"] == 64
    assert cards[DEFAULT_MODEL]["kind"] == "language"
    headers = {"Authorization": f"Bearer {KEY}"}
    listing = {m["id"]: m for m in requests.get(f"{srv.url}/api/models", headers=headers, timeout=30).json()["data"]}
    assert listing[BERT]["kind"] == "rerank" and listing[BERT]["state"] == "resident"
    assert listing[EMBEDDER]["kind"] == "embedding"


def test_every_rerank_path_needs_a_key_and_json(srv: Server) -> None:
    body = {"model": BERT, "query": QUERY, "documents": ["a"]}
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        answer = requests.post(f"{srv.url}{path}", json=body, timeout=30)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key", path
        form = requests.post(
            f"{srv.url}{path}",
            data="{}",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
            timeout=30,
        )
        assert form.status_code == 415, (path, form.text)  # a web page's simple request is refused
