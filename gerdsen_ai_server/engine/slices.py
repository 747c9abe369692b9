"""Work the engine thread does in slices between decode steps: model loads and embedding requests
(rerank requests among them: a reranker's pairs are an EmbeddingJob whose vectors are one score each).

Either, done whole, would hold the engine thread (and every stream it decodes, and every request
waiting to be prefilled) for seconds: so each engine-loop turn gives it a slice of time, as long
as the last decoding round took (within LOAD_SLICE_S), and the streams keep going meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gerdsen_ai_server.engine.embeddings import EmbeddingJob
from gerdsen_ai_server.engine.errors import EmbeddingCancelled, ModelNotFound
from gerdsen_ai_server.engine.stats import EngineStats
from gerdsen_ai_server.store.errors import ModelLoadError

if TYPE_CHECKING:
    from collections.abc import Callable

    from gerdsen_ai_server.engine.registry import ModelRegistry

log = logging.getLogger(__name__)

# Seconds a load in progress may use per engine-loop turn while models decode (at least, at most).
LOAD_SLICE_S = (0.02, 0.25)
# Embeddings go in slices of tokens sized to the time they may take (LOAD_SLICE_S, as loads): the
# first slice measures the model's speed, later ones follow it, within these bounds.
EMBED_SLICE_TOKENS = (16, 4096)
EMBED_FIRST_SLICE_TOKENS = 32


def turn_deadline(now: float, turn_ended: float, decoding: bool) -> float:
    """Until when a slice may run: as long as the decoding round since ``turn_ended`` took (within
    LOAD_SLICE_S) while models decode, else the longest slice."""
    low, high = LOAD_SLICE_S
    return now + (min(max(now - turn_ended, low), high) if decoding else high)


class Loads:
    """Loads in progress (the registry's), advanced a slice at a time."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._turn_ended = 0.0  # when advance last gave the thread back

    def advance(self, decoding: bool) -> None:
        """Loads in progress, in steps of about LOAD_CHUNK_BYTES of weights, between decoding rounds.

        While models decode, loading gets as much time per turn as the last decoding round took
        (within LOAD_SLICE_S): streams keep going at about half speed instead of pausing for the
        whole load, and the load takes about twice as long. Idle, it runs in LOAD_SLICE_S[1] turns.
        """
        now = time.monotonic()
        if not self.registry.loading:
            self._turn_ended = now
            return
        deadline = turn_deadline(now, self._turn_ended, decoding)
        while self.registry.loading and time.monotonic() < deadline:
            for pending in list(self.registry.loading.values()):
                try:
                    resident = self.registry.advance(pending)
                except ModelLoadError as exc:  # advance wraps anything else in one
                    for future in pending.waiters:
                        future.set_exception(exc)
                    continue
                if resident is not None:
                    for future in pending.waiters:
                        future.set_result(resident.loaded)
        self._turn_ended = time.monotonic()


class Embeddings:
    """Embedding jobs in arrival order, advanced a slice of tokens at a time."""

    def __init__(self, registry: ModelRegistry, stats: EngineStats, release: Callable[[], None]) -> None:
        self.registry = registry
        self._stats = stats
        self._release = release  # gives the job's place in the engine's capacity back
        self.jobs: list[EmbeddingJob] = []
        self._turn_ended = 0.0
        self._seconds_per_token: dict[str, float] = {}  # per model, measured by its last slices

    def add(self, job: EmbeddingJob) -> None:
        self.jobs.append(job)

    def forget(self, model_id: str) -> None:
        """An unloaded model's measured speed goes with it."""
        self._seconds_per_token.pop(model_id, None)

    def advance(self, decoding: bool, holding: bool) -> None:
        """Embedding jobs, oldest first, in slices of tokens between decoding rounds, as loads go.

        While models decode, embeddings get as much time per turn as the last decoding round took
        (within LOAD_SLICE_S): streams keep going at about half speed instead of pausing for the
        whole request, and a short chat is prefilled at the next turn instead of after the last
        input (while requests are held for admission, ``holding``, a turn is one short slice). Each
        slice is sized from the speed the previous one measured. A job whose caller cancelled it
        is dropped before its next slice. Measured: a 2-token chat beside a 3000-token embedding of
        the default model answered in 1.2 s (0.4 s alone, 2 shared CPU cores); computed whole, the
        embedding held it over 60 s.
        """
        now = time.monotonic()
        if not self.jobs:
            self._turn_ended = now
            return
        low, _ = LOAD_SLICE_S
        # Requests wait for their prefill: one short slice, then admit them.
        deadline = now + low if holding else turn_deadline(now, self._turn_ended, decoding)
        while self.jobs:
            job = self.jobs[0]
            resident = self.registry.get(job.model_id)
            if job.cancelled or resident is None:
                self.end(
                    job,
                    EmbeddingCancelled("cancelled")
                    if job.cancelled
                    else ModelNotFound(f"The model '{job.model_id}' is not loaded."),
                )
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            per_token = self._seconds_per_token.get(job.model_id)
            low_tokens, high_tokens = EMBED_SLICE_TOKENS
            tokens = (
                EMBED_FIRST_SLICE_TOKENS
                if per_token is None
                else int(min(max(left / max(per_token, 1e-7), low_tokens), high_tokens))
            )
            before, started = job.tokens_done, time.monotonic()
            try:
                finished = job.advance(resident.loaded.model, tokens)
            except Exception as exc:  # a bad input fails its request, never the engine
                log.exception("embedding failed")
                self.end(job, exc)
                continue
            done = job.tokens_done - before
            if done > 0:
                measured = (time.monotonic() - started) / done
                per_token = self._seconds_per_token.get(job.model_id)
                self._seconds_per_token[job.model_id] = measured if per_token is None else (per_token + measured) / 2
            self.registry.touch(resident)
            if finished:
                self.end(job, None)
        self._turn_ended = time.monotonic()

    def end(self, job: EmbeddingJob, error: BaseException | None) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        if isinstance(error, EmbeddingCancelled):
            self._stats.requests_cancelled_total += 1
        elif error is not None:
            self._stats.requests_failed_total += 1
        else:
            self._stats.requests_finished_total += 1
        self._release()
        if not job.future.done():
            if error is None:
                job.future.set_result(job.vectors)
            else:
                job.future.set_exception(error)
