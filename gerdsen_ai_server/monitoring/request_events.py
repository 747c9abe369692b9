"""Generations measured and announced, Flask-free: ``request_event`` started / finished on the event bus.

Once a generating request has submitted, ``publish_started`` announces it; once its response is
closed (an SSE stream: its last byte) or a Socket.IO ``generate`` is answered, ``publish_finished``
records each stream's time to first token, tokens and tok/s in the Prometheus histograms
(``Metrics.observe_stream``) and announces the totals, for the dashboard's Socket.IO feed. The web
layer decides when (web/request_metrics.py, serving/tracking.py); this module only measures.
"""

from __future__ import annotations

from typing import Any

from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.monitoring.prometheus import Metrics


def publish_started(events: EventBus, streams: list[TokenStream], route: str) -> None:
    """``request_event`` started: the request's id, model, route, sequences and prompt tokens."""
    first = streams[0].request
    events.publish(
        "request_event",
        event="started",
        id=first.request_id,
        model=first.model,
        route=route,
        sequences=len(streams),
        prompt_tokens=sum(len(s.request.prompt_tokens) for s in streams),
    )


def publish_finished(
    metrics: Metrics, events: EventBus, streams: list[TokenStream], route: str, status: int, elapsed: float | None
) -> None:
    """Measure every stream (Prometheus) and publish ``request_event`` finished with the totals."""
    measured = [metrics.observe_stream(s) for s in streams]
    ttfts = [m.ttft_s for m in measured if m.ttft_s is not None]
    rates = [m.tokens_per_second for m in measured if m.tokens_per_second is not None]
    outcomes = {m.outcome for m in measured}
    payload: dict[str, Any] = {
        "id": streams[0].request.request_id,
        "model": streams[0].request.model,
        "route": route,
        "status": status,
        "sequences": len(streams),
        "outcome": outcomes.pop() if len(outcomes) == 1 else "mixed",
        "prompt_tokens": sum(m.prompt_tokens for m in measured),
        "completion_tokens": sum(m.completion_tokens for m in measured),
        "ttft_s": round(min(ttfts), 4) if ttfts else None,  # the first token of any choice
        "tokens_per_second": round(sum(rates) / len(rates), 3) if rates else None,
        "duration_s": round(elapsed, 4) if elapsed is not None else None,
        "error": next((s.error for s in streams if s.error), None),
    }
    events.publish("request_event", event="finished", **payload)
