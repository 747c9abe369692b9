"""GET /metrics (Prometheus text format), the request hooks that feed it, and ``request_event``s.

* Every request is counted by route template (bounded cardinality), method and status when its
  response is made, and timed until the response is closed: for an SSE stream that is its last byte.
* Routes that generate call ``track(streams)`` once they have submitted; when the response closes,
  each stream's time to first token, tokens and tok/s go to the histograms, and a
  ``request_event`` (started, then finished) goes out on the engine's event bus for Socket.IO.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client.exposition import choose_encoder

from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.monitoring.prometheus import Metrics

bp = Blueprint("metrics", __name__)
EXTENSION = "impetus_metrics"


def init_metrics(app: Flask, metrics: Metrics) -> None:
    app.extensions[EXTENSION] = metrics
    app.before_request(_start_clock)
    app.after_request(_record)
    app.register_blueprint(bp)


@bp.get("/metrics")
def scrape() -> Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(current_app.extensions[EXTENSION].registry), content_type=content_type)


def track(streams: list[TokenStream]) -> None:
    """Called by a generating route after submitting: measure these streams when the response closes."""
    if not streams:
        return
    g.impetus_streams = streams
    events: EventBus = current_app.extensions["impetus"].events
    first = streams[0].request
    events.publish("request_event", event="started", id=first.request_id, model=first.model, route=route(),
                   sequences=len(streams), prompt_tokens=sum(len(s.request.prompt_tokens) for s in streams))


def route() -> str:
    """What request events name as the route: the path, or the Socket.IO event that generated."""
    return g.get("impetus_route") or request.path


def finish_tracking(streams: list[TokenStream], status: int, elapsed: float) -> None:
    """For generations answered outside an HTTP response (Socket.IO ``generate``): measure the
    streams and publish ``request_event`` finished, as ``_record`` does when a response closes."""
    if streams:
        _finished(current_app.extensions[EXTENSION], current_app.extensions["impetus"].events, streams, route(),
                  status, elapsed)


def _start_clock() -> None:
    g.impetus_started = time.perf_counter()


def _record(response: Response) -> Response:
    metrics: Metrics = current_app.extensions[EXTENSION]
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    method, status = request.method, response.status_code
    metrics.http_requests.labels(route, method, str(status)).inc()
    started: float | None = g.get("impetus_started")
    streams: list[TokenStream] = g.get("impetus_streams", [])
    events: EventBus = current_app.extensions["impetus"].events
    path = request.path

    def closed() -> None:  # after the last byte (or the client's disconnect); no request context here
        elapsed = time.perf_counter() - started if started is not None else None
        if elapsed is not None:
            metrics.http_latency.labels(route, method).observe(elapsed)
        if streams:
            _finished(metrics, events, streams, path, status, elapsed)

    response.call_on_close(closed)
    return response


def _finished(metrics: Metrics, events: EventBus, streams: list[TokenStream], path: str, status: int,
              elapsed: float | None) -> None:
    measured = [metrics.observe_stream(s) for s in streams]
    ttfts = [m.ttft_s for m in measured if m.ttft_s is not None]
    rates = [m.tokens_per_second for m in measured if m.tokens_per_second is not None]
    outcomes = {m.outcome for m in measured}
    payload: dict[str, Any] = {
        "id": streams[0].request.request_id, "model": streams[0].request.model, "route": path, "status": status,
        "sequences": len(streams), "outcome": outcomes.pop() if len(outcomes) == 1 else "mixed",
        "prompt_tokens": sum(m.prompt_tokens for m in measured),
        "completion_tokens": sum(m.completion_tokens for m in measured),
        "ttft_s": round(min(ttfts), 4) if ttfts else None,  # the first token of any choice
        "tokens_per_second": round(sum(rates) / len(rates), 3) if rates else None,
        "duration_s": round(elapsed, 4) if elapsed is not None else None,
        "error": next((s.error for s in streams if s.error), None),
    }
    events.publish("request_event", event="finished", **payload)
