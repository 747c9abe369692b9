"""GET /api/hardware: platform, CPU, memory, GPUs, MLX, frequency, thermal state and throttling.

Each section comes from its own probe (gerdsen_ai_server/monitoring/probes/); one that fails is null,
with the reason under ``unavailable``, and never fails the request.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from gerdsen_ai_server.monitoring.monitor import Monitor
from gerdsen_ai_server.services import require, services

bp = Blueprint("hardware", __name__, url_prefix="/api")


def monitor() -> Monitor:
    return require(services().monitor, "monitor")


@bp.get("/hardware")
def hardware() -> Response:
    return jsonify(monitor().hardware_report().model_dump())
