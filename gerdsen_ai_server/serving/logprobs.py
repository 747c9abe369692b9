"""Token log-probabilities in OpenAI's two wire shapes (chat's ``content`` list, completions' arrays)."""

from __future__ import annotations

import math
from typing import Any

from gerdsen_ai_server.engine.protocol import TokenLogprob
from gerdsen_ai_server.schemas.openai import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

# OpenAI's value for a token the model could not have picked: a grammar (tool call, JSON schema)
# masks disallowed tokens to -inf, and -Infinity is not JSON (JavaScript's JSON.parse refuses it).
IMPOSSIBLE = -9999.0


def _text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else IMPOSSIBLE


def chat_logprobs(entries: list[TokenLogprob], tokenizer: Any) -> ChatLogprobs:
    content = []
    for entry in entries:
        text = _text(tokenizer, entry.token_id)
        top = [
            TopLogprob(token=(t := _text(tokenizer, i)), logprob=_finite(lp), bytes=list(t.encode()))
            for i, lp in entry.top
        ]
        content.append(
            ChatTokenLogprob(token=text, logprob=_finite(entry.logprob), bytes=list(text.encode()), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def completion_logprobs(entries: list[TokenLogprob], tokenizer: Any, offset: int, with_top: bool) -> CompletionLogprobs:
    """``offset``: characters of this choice's text before these tokens (OpenAI's ``text_offset``)."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = _text(tokenizer, entry.token_id)
        tokens.append(text)
        values.append(_finite(entry.logprob))
        tops.append({_text(tokenizer, i): _finite(lp) for i, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops if with_top else None, text_offset=offsets
    )
