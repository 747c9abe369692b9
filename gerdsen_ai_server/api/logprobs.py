"""Token log-probabilities in OpenAI's two wire shapes (chat's ``content`` list, completions' arrays)."""

from __future__ import annotations

from typing import Any

from ..engine.stream import TokenLogprob
from ..schemas.openai import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def chat_logprobs(entries: list[TokenLogprob], tokenizer: Any) -> ChatLogprobs:
    content = []
    for entry in entries:
        text = _text(tokenizer, entry.token_id)
        top = [TopLogprob(token=(t := _text(tokenizer, i)), logprob=lp, bytes=list(t.encode())) for i, lp in entry.top]
        content.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=list(text.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(entries: list[TokenLogprob], tokenizer: Any, offset: int, with_top: bool) -> CompletionLogprobs:
    """``offset``: characters of this choice's text before these tokens (OpenAI's ``text_offset``)."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = _text(tokenizer, entry.token_id)
        tokens.append(text)
        values.append(entry.logprob)
        tops.append({_text(tokenizer, i): lp for i, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops if with_top else None,
                              text_offset=offsets)
