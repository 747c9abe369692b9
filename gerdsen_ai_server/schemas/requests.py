"""Wire formats of /api/requests: the generations and embeddings running now, for the operator."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class RunningRequest(BaseModel):
    id: str = Field(description="This request's id here (32 hex digits); the `id` of its request_event too.")
    object: Literal["request"] = "request"
    kind: str = Field(description="chat, completion, messages, responses, embeddings, rerank or generate (Socket.IO).")
    route: str = Field(description="The path (or Socket.IO event) it came in on.")
    model: str
    sequences: int = Field(description="Sequences it runs: its choices (n) times its prompts; 0 for embeddings.")
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens generated so far, all its sequences together.")
    embedded_tokens: int = Field(0, description="Input tokens embedded so far (embeddings).")
    age_s: float = Field(description="Seconds since it was submitted.")
    deadline_in_s: float | None = Field(description="Seconds left before IMPETUS_REQUEST_TIMEOUT ends it; null: none.")
    client: str | None = Field(description="The client's address (after IMPETUS_TRUSTED_PROXIES).")
    key_id: str | None = Field(description="Which API key sent it: a digest's prefix, never the key; null: no key.")
    request_id: str | None = Field(description="Its X-Request-ID, as the access log names it.")
    cancelled: bool = Field(False, description="An operator cancelled it; it ends at its reader's next check.")


class RunningRequestList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RunningRequest]
