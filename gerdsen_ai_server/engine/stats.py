"""The engine's counters: what /health, /metrics and the dashboard feed read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Counters read by /health, /metrics and the dashboard feed (plain ints: safe to read anywhere).

    The engine thread and the backends (llama.cpp's from its own thread) add to the live counters;
    ``InferenceEngine.stats()`` hands out a snapshot with the sequence counts of every backend.
    """

    requests_in_flight: int = 0
    active_sequences: int = 0
    queued_sequences: int = 0
    max_batch: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    requests_finished_total: int = 0
    requests_failed_total: int = 0
    requests_cancelled_total: int = 0
    prompt_cache_hits_total: int = 0
    prompt_cache_misses_total: int = 0
    prompt_cache_bytes: int = 0
    steps_total: int = 0
    speculative_drafted_total: int = 0  # tokens drafted by speculative decoding (engine/speculative.py)
    speculative_accepted_total: int = 0  # of those, accepted by the model
    speculative_passes_total: int = 0  # verification passes (one per speculating batch step)
    speculative_rows_total: int = 0  # sequences that drafted, summed over those passes
