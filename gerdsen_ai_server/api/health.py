"""Probes: /health (details), /health/live (process up), /health/ready (model loaded, engine alive)."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response, current_app, jsonify

from .. import __version__
from ..blas import blas_in_use
from ..engine.engine import InferenceEngine
from ..memory import allocator
from ..schemas.health import HealthReport, Liveness, Readiness, ResidentModel

bp = Blueprint("health", __name__)


def _engine() -> InferenceEngine:
    return current_app.extensions["impetus"]


def readiness() -> tuple[bool, str]:
    engine = _engine()
    drain = current_app.extensions.get("impetus_drain")
    if drain is not None and drain.draining.is_set():
        return False, "the server is shutting down"
    if not engine.is_alive():
        return False, "the inference engine thread is not running"
    if current_app.config.get("IMPETUS_LOAD_ERROR"):
        return False, f"the default model failed to load: {current_app.config['IMPETUS_LOAD_ERROR']}"
    if not engine.models():
        return False, "the default model is still loading"
    return True, "ready"


@bp.get("/health")
def health() -> Response:
    engine = _engine()
    ready, reason = readiness()
    return jsonify(HealthReport(
        status="ok" if ready else "degraded",
        ready=ready,
        reason=reason,
        version=__version__,
        pid=os.getpid(),
        uptime_s=round(time.time() - engine.started_at, 3),
        engine_alive=engine.is_alive(),
        requests_in_flight=engine.inflight,
        compute_dtype=engine.compute_dtype or "as stored",
        blas=blas_in_use(),
        allocator=allocator(),
        prompt_cache_enabled=engine.prompt_cache_enabled,
        prompt_cache_bytes=engine.stats().prompt_cache_bytes,
        prompt_cache_limit_bytes=current_app.config["IMPETUS_SETTINGS"].prompt_cache_bytes,
        max_batch=engine.max_batch,
        batch_limit=engine.batch_limit,  # set while the machine is hot (thermal adaptation)
        thermal_state=_thermal_state(),
        models=[ResidentModel(id=m.model_id, path=str(m.path), context_length=m.context_length, bytes=m.nbytes)
                for m in engine.models()],
    ).model_dump())


def _thermal_state() -> str | None:
    monitor = current_app.extensions.get("impetus_monitor")
    return monitor.thermal.state if monitor is not None and monitor.thermal is not None else None


@bp.get("/health/live")
def live() -> Response:
    return jsonify(Liveness().model_dump())


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    ok, reason = readiness()
    return jsonify(Readiness(status="ready" if ok else "not_ready", reason=reason).model_dump()), 200 if ok else 503
