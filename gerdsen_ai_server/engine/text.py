"""The text step every backend shares: a sampled token in, a ``TokenEvent`` out.

Per sequence: the token is detokenized (mlx-lm's streaming detokenizers; the end-of-turn token is
not part of the answer), the new text goes through the stop-string matcher (which never lets a
stop string, or the start of one split across tokens, reach the client), and the step's event
carries the text, the token, its log-probabilities when asked for, the finish reason and usage.
Both backends (MLX's BatchGenerator, llama.cpp's slots) run exactly this, so their text is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenLogprob


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could start one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string reached or None)."""
        if not self._stops:
            return text, None
        self._pending += text
        hits = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            at, stop = min(hits)
            out = self._pending[:at]
            self._pending = ""
            return out, stop
        hold = self._longest_partial_stop()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _longest_partial_stop(self) -> int:
        pending = self._pending
        for k in range(min(len(pending), max(len(s) for s in self._stops) - 1), 0, -1):
            tail = pending[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


def make_detokenizer(tokenizer: Any, strip_leading_space: bool) -> Any:
    detokenizer = tokenizer.detokenizer
    if not strip_leading_space and hasattr(detokenizer, "_maybe_trim_space"):
        # The BPE detokenizer trims only while its text is empty: start it with a sentinel
        # character that ``last_segment`` (which reads from ``offset``) never returns.
        detokenizer.text, detokenizer.offset = "\x00", 1
    elif not strip_leading_space and hasattr(detokenizer, "trim_space"):
        detokenizer.trim_space = False  # SentencePiece models
    return detokenizer


class TextStep:
    """One sequence's text: its detokenizer, stop strings, end tokens and completion count."""

    def __init__(self, tokenizer: Any, request: GenerationRequest) -> None:
        self.detokenizer = make_detokenizer(tokenizer, request.strip_leading_space)
        self.stop = StopMatcher(request.stop)
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.prompt_tokens = len(request.prompt_tokens)
        self.logprobs = request.logprobs  # None: none; k: the chosen token's and k alternatives
        self.completion_tokens = 0

    def event(self, token: int, finish: str | None, logprob_of: Callable[[int, int], TokenLogprob]) -> TokenEvent:
        """The event of ``token`` (``finish``: the backend's own reason to end here, or None).

        ``logprob_of(token, top)`` is called only when the request asked for log-probabilities.
        A stop string ends the sequence (``finish_reason`` "stop", ``stop_sequence`` set): the
        backend then drops it from its batch. At the end the matcher's held-back text is flushed.
        """
        self.completion_tokens += 1
        logprobs: list[TokenLogprob] = []
        if not (finish == "stop" and token in self.eos_ids):
            self.detokenizer.add_token(token)  # the end-of-turn token is not part of the answer
            if self.logprobs is not None:
                logprobs.append(logprob_of(token, self.logprobs))
        if finish is not None:
            self.detokenizer.finalize()
        text, hit_stop = self.stop.feed(self.detokenizer.last_segment)
        if hit_stop:
            finish = "stop"
        elif finish is not None:
            text += self.stop.flush()
        return TokenEvent(
            text=text,
            token_ids=[token],
            finish_reason=finish,
            stop_sequence=hit_stop,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            logprobs=logprobs,
        )
