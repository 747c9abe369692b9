"""What the in-process tests share besides fixtures: the tiny models' ids, a JSON POST, the error object."""

from __future__ import annotations

import json
from typing import Any

from flask.testing import FlaskClient

LLAMA = "tiny-llama"  # a 2-layer llama, SmolLM2's tokenizer and chat template, 512-token context
BERT = "tiny-bert"  # a BERT embedding model, 32 dimensions, 64 positions


def post(client: FlaskClient, path: str, body: dict[str, Any] | str | bytes, **headers: str) -> Any:
    """POST ``body`` as JSON (a str or bytes is sent as is, for bodies json.dumps cannot write)."""
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, data=data, headers={"Content-Type": "application/json", **headers})


def error_of(response: Any) -> dict[str, Any]:
    """The error object of an answer, in OpenAI's envelope or Anthropic's."""
    body = response.get_json()
    assert isinstance(body, dict) and "error" in body, (response.status_code, response.get_data(as_text=True)[:300])
    return body["error"]  # type: ignore[no-any-return]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
