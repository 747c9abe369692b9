"""Probes: /health (details), /health/live (process up), /health/ready (model loaded, engine alive).

With API keys configured these stay open (an orchestrator needs no secret), so what they show a
caller without a key is only what a load balancer needs: no absolute path, no PID, no load error
(which names files). A valid key, or no keys at all (the local user), sees everything.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from flask import Blueprint, Response, jsonify

from gerdsen_ai_server import __version__
from gerdsen_ai_server.engine.backends.choice import choose
from gerdsen_ai_server.runtime.blas import blas_in_use
from gerdsen_ai_server.runtime.memory import allocator
from gerdsen_ai_server.schemas.health import (
    BackendReport,
    HealthReport,
    Liveness,
    PromptCacheTiers,
    Readiness,
    ResidentModel,
)
from gerdsen_ai_server.services import services
from gerdsen_ai_server.web.security import may_see_details

bp = Blueprint("health", __name__)


def readiness(detail: bool = True) -> tuple[bool, str]:
    """Whether the server can answer, and why not; ``detail`` False leaves the load error out."""
    found = services()
    engine, drain = found.engine, found.drain
    if drain is not None and drain.draining.is_set():
        return False, "the server is shutting down"
    if not engine.is_alive():
        return False, "the inference engine thread is not running"
    if found.load_error:
        if not detail:
            return False, "the default model failed to load (the details need an API key)"
        return False, f"the default model failed to load: {found.load_error}"
    if not engine.models():
        return False, "the default model is still loading"
    return True, "ready"


@bp.get("/health")
def health() -> Response:
    engine = services().engine
    detail = may_see_details()
    ready, reason = readiness(detail)
    return jsonify(
        HealthReport(
            status="ok" if ready else "degraded",
            ready=ready,
            reason=reason,
            version=__version__,
            pid=os.getpid() if detail else None,
            uptime_s=round(time.time() - engine.started_at, 3),
            engine_alive=engine.is_alive(),
            requests_in_flight=engine.inflight,
            compute_dtype=engine.compute_dtype or "as stored",
            backend=BackendReport.model_validate(asdict(choose(services().settings.backend))),
            blas=blas_in_use(),
            allocator=allocator(),
            prompt_cache_enabled=engine.prompt_cache_enabled,
            prompt_cache_bytes=engine.stats().prompt_cache_bytes,
            prompt_cache_limit_bytes=services().settings.prompt_cache_bytes_value(),
            prompt_cache_tiers=PromptCacheTiers.model_validate(
                {name: asdict(tier) for name, tier in engine.prompt_cache.tiers().items()}
            ),
            max_batch=engine.max_batch,
            batch_limit=engine.batch_limit,  # set while the machine is hot (thermal adaptation)
            thermal_state=_thermal_state(),
            models=[
                ResidentModel(
                    id=m.model_id,
                    path=str(m.path) if detail else None,
                    context_length=m.context_length,
                    bytes=m.nbytes,
                    backend=m.backend,
                )
                for m in engine.models()
            ],
        ).model_dump()
    )


def _thermal_state() -> str | None:
    monitor = services().monitor
    return monitor.thermal.state if monitor is not None and monitor.thermal is not None else None


@bp.get("/health/live")
def live() -> Response:
    return jsonify(Liveness().model_dump())


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    ok, reason = readiness(may_see_details())
    return jsonify(Readiness(status="ready" if ok else "not_ready", reason=reason).model_dump()), 200 if ok else 503
