"""What a caller hands the engine and what it gets back.

Every consumer (SSE, plain JSON, Socket.IO, the bench) reads the same ``TokenStream`` of
``TokenEvent``s; none of them sees MLX.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gerdsen_ai_server.engine.errors import EngineGone as EngineGone  # raised here; defined with the engine's errors
from gerdsen_ai_server.engine.images import ImageInput


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None

    @property
    def seeded(self) -> bool:
        """A seed and a temperature above 0: draws we promise to reproduce whatever else is in the batch."""
        return self.seed is not None and self.temperature > 0


@dataclass(frozen=True)
class SpeculativeParams:
    """Speculative decoding of one request, named after vLLM's ``speculative_config``: prompt lookup
    ("ngram") drafts up to ``num_tokens`` tokens by matching the last ``lookup_max``..``lookup_min``
    tokens earlier in the context (engine/speculative.py). It never changes the answer."""

    method: str = "ngram"  # or "draft_model": a small model of the same vocabulary drafts
    num_tokens: int = 5
    lookup_max: int = 3
    lookup_min: int = 1
    draft: Any = None  # "draft_model": the draft model's MLX module (a resident's), used on the engine thread


@dataclass
class GenerationRequest:
    model: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    # mlx-lm's detokenizers drop the first token's leading space (right for chat answers); a text
    # completion keeps it, so that prompt + completion reads as the model wrote it.
    strip_leading_space: bool = True
    # None: no log-probabilities; 0: the chosen token's; k: also the k most likely alternatives.
    logprobs: int | None = None
    # Extra (tokens, logits) -> logits functions, e.g. a grammar for structured output.
    logits_processors: list[Callable[[Any, Any], Any]] = field(default_factory=list)
    # The images of a vision model's prompt, in the order their placeholders appear in it.
    images: list[ImageInput] = field(default_factory=list)
    speculative: SpeculativeParams | None = None  # None: plain decoding
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One step of one request: new text, or the end of it (``finish_reason`` or ``error``)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None  # which stop string ended it, when one did
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


# How often a reader waiting on its stream runs its ``watch`` (client still there? deadline?): often
# enough that an abandoned request's sequences leave the batch within about a second.
WATCH_INTERVAL_S = 0.25


class EventSource(Protocol):
    """What the serving layer reads a choice from: a ``TokenStream``, or a wrapper that sees its
    events go by (the Responses API's ``LogprobTap``)."""

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def cancel(self) -> None: ...


class TokenStream:
    """The reading end of one request. Iterate it for events; ``cancel()`` frees its slot.

    ``watch``, when set by the caller, runs in the reading thread at least every WATCH_INTERVAL_S
    while it iterates, busy or idle, and may raise to end the reading (the client went away, the
    request's deadline passed, an operator cancelled it): the stream is cancelled first, so the
    engine drops its sequence at its next step. The engine itself never calls it.
    """

    def __init__(self, request: GenerationRequest, engine_alive: Callable[[], bool]) -> None:
        self.request = request
        # SimpleQueue (C): a put and a get cost a fraction of queue.Queue's (two Conditions and a lock
        # in Python), paid once a token on the engine thread and once on the reader's. Measured at 16
        # streams on the micro-model proxy (bench/overhead.py): see docs/performance.md.
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._ended = threading.Event()  # its last event was put (wait_end)
        self._engine_alive = engine_alive
        self.watch: Callable[[], None] | None = None
        self.coalesce = 0.0  # seconds its streamed response waits after each write (IMPETUS_STREAM_COALESCE_MS)
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished = False
        # What the engine last reported, for metrics once the request is over (api/metrics.py).
        self.finished_at: float | None = None
        self.completion_tokens = 0
        self.error: str | None = None

    # engine side
    def put(self, event: TokenEvent) -> None:
        if self.first_token_at is None and event.token_ids:
            self.first_token_at = time.monotonic()
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        if event.done:
            self.finished_at, self.error = time.monotonic(), event.error
        self._events.put(event)
        if event.done:
            self._ended.set()

    # caller side
    @property
    def ready(self) -> bool:
        """Whether another event is already waiting: its reader can go on without blocking, so a
        streaming response joins what it has into one write instead of one write a token."""
        return not self._events.empty()

    def wait_end(self, seconds: float) -> None:
        """Wait up to ``seconds``, less if the engine puts the last event meanwhile."""
        self._ended.wait(seconds)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _check(self) -> None:
        """Run ``watch``; whatever it raises cancels this stream and ends the reading."""
        if self.watch is None:
            return
        try:
            self.watch()
        except BaseException:
            self.cancel()
            self.finished = True
            raise

    def __iter__(self) -> Iterator[TokenEvent]:
        interval = WATCH_INTERVAL_S if self.watch is not None else 1.0
        checked = time.monotonic()
        while not self.finished:
            if time.monotonic() - checked >= interval:  # also while events keep coming
                self._check()
                checked = time.monotonic()
            try:
                event = self._events.get(timeout=interval)
            except queue.Empty:
                self._check()
                checked = time.monotonic()
                if self.cancelled:  # the engine drops a cancelled request without a last event
                    self.finished = True
                    return
                # Never wait forever on a dead engine thread.
                if not self._engine_alive():
                    self.finished = True
                    raise EngineGone("the inference engine stopped") from None
                continue
            if event.done:
                self.finished = True
            yield event

    def collect(self) -> tuple[str, TokenEvent]:
        """Read to the end: the whole text and the final event (finish reason and usage)."""
        parts: list[str] = []
        last = TokenEvent()
        for event in self:
            parts.append(event.text)
            last = event
        return "".join(parts), last
