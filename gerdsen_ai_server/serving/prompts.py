"""Prompts and embedding inputs as token ids, weighed before the tokenizer runs: how many there are
(against the engine's places) and how long each text is (against the model's context).

Plain functions of values: the engine's capacity is passed in (``capacity``), so nothing here
reaches for the app.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.embeddings import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from gerdsen_ai_server.schemas.openai import CompletionRequest

_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# A token covers at most its vocabulary entry's length of text ("Ġthe" four bytes, "▁the" four
# characters, "##ing" three), unless the tokenizer's normalizer shrinks the text first (accents
# stripped, whitespace dropped): the margin keeps such texts from being refused wrongly.
TEXT_SIZE_MARGIN = 4


def capacity(engine: InferenceEngine) -> int:
    """How many sequences the engine runs and queues at once (IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE)."""
    return engine.max_batch + engine.max_queue


def check_sequence_count(prompts: int, n: int, capacity: int) -> None:
    """Refuses more sequences than the engine runs and queues, before anything is tokenized: 20,000
    prompts used to cost ~6 s of CPU in the tokenizer before ``submit_all`` refused them."""
    if prompts * n > capacity:
        raise APIError(
            400,
            f"This request asks for {prompts * n} sequences; this server runs at most "
            f"{capacity} at once (IMPETUS_MAX_BATCH + IMPETUS_MAX_QUEUE).",
            param="n",
            code="invalid_value",
        )


def max_token_chars(tokenizer: Any) -> int | None:
    """The longest vocabulary entry, measured once per tokenizer (~30 ms for 50k entries); None
    when the tokenizer does not list its vocabulary."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    source = tokenizer if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "_tokenizer", None)
    try:
        longest = max((len(piece) for piece in source.get_vocab()), default=0) if source is not None else 0
    except Exception:  # a tokenizer without a usable vocabulary listing: no size check
        return None
    if longest < 1:
        return None
    with contextlib.suppress(TypeError):  # not weak-referenceable: measured again next time
        _TOKEN_CHARS[tokenizer] = longest
    return longest


def check_text_size(loaded: LoadedModel, texts: list[str], param: str) -> None:
    """Refuses a text that cannot fit the context, before tokenizing it: at most ``max_token_chars``
    characters per token (with ``TEXT_SIZE_MARGIN``), so a longer text has more tokens than the
    context holds. An 8 MB prompt was tokenized whole (seconds of CPU) only to be refused."""
    longest = max(map(len, texts), default=0)
    if not longest:
        return
    per_token = max_token_chars(loaded.tokenizer)
    if per_token is None:
        return
    limit = loaded.context_length * per_token * TEXT_SIZE_MARGIN
    if longest > limit:
        raise APIError(
            400,
            f"A text in '{param}' has {longest} characters, more than any text that fits this "
            f"model's context of {loaded.context_length} tokens.",
            param=param,
            code="context_length_exceeded",
        )


def prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    """The separate prompts (or embedding inputs) of OpenAI's four shapes: a text, texts, one
    token-id list, token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def completion_prompts(
    body: CompletionRequest | EmbeddingRequest, loaded: LoadedModel, capacity: int
) -> list[list[int]]:
    """Each prompt (or embedding input) as token ids. Counts and sizes are checked before the
    tokenizer runs, so a request that will be refused costs no tokenizing."""
    prompt = body.prompt if isinstance(body, CompletionRequest) else body.input
    param = "prompt" if isinstance(body, CompletionRequest) else "input"
    batches = prompt_items(prompt)
    if not batches:
        raise APIError(400, f"The {param} must not be empty.", param=param, code="invalid_value")
    if isinstance(body, CompletionRequest):
        check_sequence_count(len(batches), body.n, capacity)
    elif len(batches) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"At most {MAX_EMBEDDING_INPUTS} inputs per request.", param=param, code="invalid_value")
    check_text_size(loaded, [item for item in batches if isinstance(item, str)], param)
    vocab = len(loaded.tokenizer)
    out: list[list[int]] = []
    for item in batches:
        tokens = loaded.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if any(t < 0 or t >= vocab for t in tokens):
            raise APIError(
                400,
                f"The {param} holds token ids outside the vocabulary (0..{vocab - 1}).",
                param=param,
                code="invalid_value",
            )
        out.append(tokens)
    return out
