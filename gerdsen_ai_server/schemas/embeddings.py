"""Pydantic models of OpenAI's embeddings API (/v1/embeddings): the request and the list it answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gerdsen_ai_server.schemas.openai import REQUEST_CONFIG

MAX_EMBEDDING_INPUTS = 256  # inputs per /v1/embeddings request, counted before any is tokenized


class EmbeddingRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
