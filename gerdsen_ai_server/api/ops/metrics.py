"""GET /metrics: the Prometheus text format (OpenMetrics when the Accept header asks for it).

What it exposes is monitoring/prometheus.py's registry: the request counters and histograms that
web/request_metrics.py feeds, and the engine's gauges read at scrape time.
"""

from __future__ import annotations

from flask import Blueprint, Response, request
from prometheus_client.exposition import choose_encoder

from gerdsen_ai_server.services import require, services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(require(services().metrics, "metrics").registry), content_type=content_type)
