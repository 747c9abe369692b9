"""The app factory: settings, engine, blueprints, error handlers. Nothing happens at import time."""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
from concurrent.futures import Future
from typing import Any

from flask import Flask

from gerdsen_ai_server.api import (  # noqa: F401  (on openai.bp)
    anthropic,
    chat,
    embeddings,
    hardware,
    health,
    models,
    openai,
    responses,
    server_config,
)
from gerdsen_ai_server.api.dashboard import init_dashboard
from gerdsen_ai_server.api.docs import bp as docs_bp
from gerdsen_ai_server.api.metrics import init_metrics
from gerdsen_ai_server.api.pulls import init_pulls
from gerdsen_ai_server.api.realtime import init_realtime, socketio
from gerdsen_ai_server.api.requests import bp as running_requests_bp
from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.formats.loaders import LoadedModel
from gerdsen_ai_server.monitoring.hardware import probe_for_this_machine
from gerdsen_ai_server.monitoring.monitor import Monitor
from gerdsen_ai_server.monitoring.prometheus import Metrics
from gerdsen_ai_server.web.errors import register_error_handlers
from gerdsen_ai_server.web.guard import init_guard
from gerdsen_ai_server.web.request_log import configure_logging, init_request_log
from gerdsen_ai_server.web.security import init_security, trust_proxies
from gerdsen_ai_server.web.shutdown import init_shutdown

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    settings = Settings.from_mapping(config)
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__)
    app.config["IMPETUS_SETTINGS"] = settings
    app.json.sort_keys = False  # type: ignore[attr-defined]

    engine = InferenceEngine(
        models_dir=settings.models_dir,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        compute_dtype=settings.compute_dtype,
        prompt_cache_bytes=settings.prompt_cache_bytes,
        memory_budget=settings.memory_budget_bytes(),
        keep_alive=settings.keep_alive_seconds(),
        on_crash=_exit_worker,
        crash_after_steps=settings.fault_engine_crash_after_steps,
        mlx_cache_limit=settings.mlx_cache_limit,
        admit_window=settings.admit_window_ms / 1000,
    )
    engine.init_app(app)
    engine.start()
    atexit.register(engine.shutdown)

    monitor = Monitor(engine, probe_for_this_machine(settings.fault_thermal_state), engine.events,
                      interval=settings.metrics_interval, thermal_interval=settings.thermal_interval,
                      thermal_batch_size=settings.thermal_batch_size)
    app.extensions[hardware.EXTENSION] = monitor
    atexit.register(monitor.stop)

    register_error_handlers(app)
    init_request_log(app)  # first: every later hook and error already has the request id
    init_metrics(app, Metrics(engine, monitor))  # before security: refused requests are counted and timed too
    init_dashboard(app, settings.dashboard_path())  # before security: the page loads without a key, then asks
    init_security(app, settings)  # size limit, API keys, rate limits
    app.register_blueprint(openai.bp)  # with /v1/chat/completions, which api/chat.py adds to it
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(server_config.bp)  # /api/config, for the dashboard
    app.register_blueprint(hardware.bp)
    app.register_blueprint(running_requests_bp)  # GET/DELETE /api/requests (admin scope: security.py)
    init_pulls(app)  # /api/models/pull, /pulls, /discover, DELETE /api/models/<id>
    init_realtime(app)  # starts the monitor's loop as a Socket.IO background task
    app.register_blueprint(docs_bp)  # /openapi.json, /docs
    init_shutdown(app)  # SIGTERM: not ready, finish running requests (gunicorn_conf installs it)
    # Outside Socket.IO's middleware, so it covers both: Host allow-list, Socket.IO's Origin, key,
    # rate limit and caps before any Engine.IO session exists.
    init_guard(app, settings, socketio.server.eio)
    trust_proxies(app, settings)  # last: wraps every middleware, so all of them see the client's address

    if settings.default_model:
        _load_default(app, engine, settings.default_model)
    return app


def _exit_worker() -> None:
    """The engine thread died: stop this worker (SIGTERM, Gunicorn's graceful path) so the master
    starts a fresh one, instead of serving nothing but errors. Readiness is already 503."""
    log.critical("inference engine died; restarting this worker")
    os.kill(os.getpid(), signal.SIGTERM)


def _load_default(app: Flask, engine: InferenceEngine, spec: str) -> None:
    """Load in the background: /health/live answers at once, /health/ready once the model is in."""

    def done(future: Future[LoadedModel]) -> None:
        exc = future.exception()
        if exc is not None:
            app.config["IMPETUS_LOAD_ERROR"] = str(exc)
            log.error("default model %s failed to load: %s", spec, exc)
        else:
            log.info("model %s ready", future.result().model_id)

    # trusted: the operator named it (--model, IMPETUS_DEFAULT_MODEL), so any path on the host may load
    engine.load_model(spec, keep_alive=math.inf, pinned=True, trusted=True).add_done_callback(done)
