"""GET /api/hardware: platform, CPU, memory, GPUs, MLX, frequency, thermal state and throttling.

Each section comes from its own probe (gerdsen_ai_server/monitoring/hardware.py); one that fails is null,
with the reason under ``unavailable``, and never fails the request.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from gerdsen_ai_server.monitoring.monitor import Monitor

bp = Blueprint("hardware", __name__, url_prefix="/api")
EXTENSION = "impetus_monitor"


def monitor() -> Monitor:
    return current_app.extensions[EXTENSION]


@bp.get("/hardware")
def hardware() -> Response:
    return jsonify(monitor().hardware_report().model_dump())
