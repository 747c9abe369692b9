"""Pydantic models of the rerank API (/v1/rerank, /rerank): the shape llama-server, vLLM, Jina and
Cohere share, a query and documents in, documents' indexes by relevance out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from gerdsen_ai_server.schemas.openai import REQUEST_CONFIG

MAX_RERANK_DOCUMENTS = 1000  # documents per request: Cohere's documented limit (vLLM sets none)


class RerankDocument(BaseModel):
    """A document as an object (Jina's and Cohere v1's form); only its ``text`` is ranked."""

    model_config = REQUEST_CONFIG

    text: str


class RerankRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)
    query: str
    documents: list[str | RerankDocument] = Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)
    top_n: int | None = Field(
        None, ge=1, description="How many results, the most relevant first; all when null or beyond the documents."
    )
    return_documents: bool = Field(
        False, description="Each result carries its document's text (Cohere's default: false)."
    )

    @field_validator("documents", mode="before")
    @classmethod
    def _each_a_text(cls, documents: object) -> object:
        """One message naming the document, instead of pydantic's error per member of the union."""
        if isinstance(documents, list):
            for index, document in enumerate(documents):
                if not isinstance(document, str) and not (
                    isinstance(document, dict) and set(document) == {"text"} and isinstance(document["text"], str)
                ):
                    raise ValueError(f'document {index} is neither a string nor {{"text": string}}')
        return documents


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="The document's position in the request's ``documents``.")
    relevance_score: float = Field(
        description="The cross-encoder's logit through its activation: sigmoid (0 to 1) unless the model "
        "declares Identity (sentence-transformers' activation_fn), as vLLM and sentence-transformers score."
    )
    document: RerankResultDocument | None = Field(None, description="Only when return_documents is true.")


class RerankUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of every (query, document) pair as the model read them.")
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    results: list[RerankResult]
    usage: RerankUsage
