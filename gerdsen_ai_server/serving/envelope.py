"""OpenAI's response envelope, shared by completions and chat completions: the id, creation time
and fingerprint of a response, its usage, and the shape of a streamed chunk."""

from __future__ import annotations

import time
import uuid
from typing import Any

from gerdsen_ai_server import __version__
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.schemas.openai import ChatCompletionChunk, Completion, Usage

FINGERPRINT = f"fp_impetus_{__version__}"


def request_meta(prefix: str, loaded: LoadedModel) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": loaded.model_id,
        "system_fingerprint": FINGERPRINT,
    }


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chunk_payload(chunk: ChatCompletionChunk | Completion, include_usage: bool) -> dict[str, Any]:
    """OpenAI's chunk shape: nulls kept, ``usage`` only when asked for, deltas without unset keys."""
    payload = chunk.model_dump()
    if not include_usage:
        payload.pop("usage", None)
    for choice in payload["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return payload
