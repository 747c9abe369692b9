"""Burst holding: requests received together are admitted into the batch together.

Requests sent together arrive a few milliseconds apart, and admitted as they came they were
prefilled in several passes, each a stall of every running stream. Worse, clients whose answers
end together (closed-loop clients, an agent's parallel calls) come back together, and when their
wave had been split their streams ended at different steps, so the next wave split again. So a
received request waits while others keep arriving at most one decode step apart (the time one more
token would take), within the admission window (IMPETUS_ADMIT_WINDOW_MS); running streams keep
decoding meanwhile. Measured at 8 closed-loop streams on 2 CPU cores: every wave prefilled in one
pass instead of 2-4 (docs/performance.md).
"""

from __future__ import annotations

import time

from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenStream

# A received request waits for the rest of its burst while requests keep coming at most one decode
# step apart (at least ADMIT_QUIET_S; never beyond the admission window, IMPETUS_ADMIT_WINDOW_MS).
ADMIT_QUIET_S = 0.002
ADMIT_POLL_S = 0.001  # how often an idle engine holding requests looks for the rest of the burst


class Admission:
    """Requests received by the engine thread and held back from the batch for the rest of their burst."""

    def __init__(self, window: float) -> None:
        # Seconds an idle engine may wait for the rest of a burst of requests before prefilling.
        self.window = window
        self.held: list[tuple[GenerationRequest, TokenStream]] = []
        self._held_since = 0.0  # when the oldest held request was received
        self._last_received = 0.0
        self.decode_seconds = 0.0  # how long the last step that only decoded (with a forward pass) took

    def receive(self, request: GenerationRequest, stream: TokenStream) -> None:
        now = time.monotonic()
        if not self.held:
            self._held_since = now
        self.held.append((request, stream))
        self._last_received = now

    def take(self, room: int) -> list[tuple[GenerationRequest, TokenStream]]:
        """The held requests to start now: none while more of their burst may still come and the
        batch has ``room`` for it (free sequences, at most one prefill pass), else all of them."""
        if not self.held:
            return []
        now = time.monotonic()
        quiet = max(ADMIT_QUIET_S, self.decode_seconds)
        if len(self.held) < room and now - self._held_since < self.window and now - self._last_received < quiet:
            return []
        return self.release()

    def release(self) -> list[tuple[GenerationRequest, TokenStream]]:
        """Every held request, now (to start, or to fail when the engine stops)."""
        held, self.held = self.held, []
        return held
