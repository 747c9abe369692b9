"""What the in-process engine tests read back: a chat prompt's token ids, and an answer's tokens and logprobs."""

from __future__ import annotations

from typing import Any

Answer = tuple[list[int], list[float]]


def chat(model: Any, text: str) -> list[int]:
    """``text`` as one user message through ``model``'s chat template, ready for the assistant's answer."""
    return list(model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def answer_of(stream: Any) -> Answer:
    """Every token id and its logprob of a finished stream; fails on an error event."""
    ids: list[int] = []
    logprobs: list[float] = []
    for event in stream:
        assert event.error is None, event.error
        ids += event.token_ids
        logprobs += [lp.logprob for lp in event.logprobs]
    return ids, logprobs
