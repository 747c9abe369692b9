"""Every HTTP request counted and timed for Prometheus; a generating one's streams measured when it closes.

* Every request is counted by route template (bounded cardinality), method and status when its
  response is made, and timed until the response is closed: for an SSE stream that is its last byte.
* Routes that generate call ``track(streams)`` (serving/tracking.py) once they have submitted; when
  the response closes, each stream's time to first token, tokens and tok/s go to the histograms, and
  a ``request_event`` (finished) goes out on the engine's event bus for Socket.IO
  (monitoring/request_events.py). GET /metrics itself is api/ops/metrics.py.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.monitoring.prometheus import Metrics
from gerdsen_ai_server.monitoring.request_events import publish_finished
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.tracking import tracked_streams


def init_request_metrics(app: Flask, metrics: Metrics) -> None:
    """Before security's hooks (app.py), so that refused requests are counted and timed too."""
    found = services(app)
    found.metrics = metrics
    events = found.engine.events
    app.before_request(_start_clock)
    app.after_request(lambda response: _record(metrics, events, response))


def _start_clock() -> None:
    g.impetus_started = time.perf_counter()


def _record(metrics: Metrics, events: EventBus, response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    method, status = request.method, response.status_code
    metrics.http_requests.labels(route, method, str(status)).inc()
    started: float | None = g.get("impetus_started")
    streams: list[TokenStream] = tracked_streams()
    path = request.path

    def closed() -> None:  # after the last byte (or the client's disconnect); no request context here
        elapsed = time.perf_counter() - started if started is not None else None
        if elapsed is not None:
            metrics.http_latency.labels(route, method).observe(elapsed)
        if streams:
            publish_finished(metrics, events, streams, path, status, elapsed)

    response.call_on_close(closed)
    return response
