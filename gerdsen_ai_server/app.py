"""The app factory: settings, services, blueprints, error handlers. Nothing happens at import time.

``create_app(config)`` builds and starts its own inference engine (and loads the default model);
``create_app(config, engine=engine)`` serves an engine the caller built and owns instead: the
factory neither starts it, nor loads a model into it, nor stops it at exit. The in-process tests
(tests/inprocess/) share one engine between the apps they build that way.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from flask import Flask

from gerdsen_ai_server.api import anthropic
from gerdsen_ai_server.api.admin import config as server_config
from gerdsen_ai_server.api.admin import hardware, pulls
from gerdsen_ai_server.api.admin import models as admin_models
from gerdsen_ai_server.api.admin import presets as admin_presets
from gerdsen_ai_server.api.admin import requests as admin_requests
from gerdsen_ai_server.api.openai import chat, completions, embeddings, responses
from gerdsen_ai_server.api.openai import models as openai_models
from gerdsen_ai_server.api.openai import rerank as rerank_routes
from gerdsen_ai_server.api.openai import tokenize as tokenize_routes
from gerdsen_ai_server.api.ops import health
from gerdsen_ai_server.api.ops import metrics as metrics_route
from gerdsen_ai_server.api.ops.dashboard import init_dashboard
from gerdsen_ai_server.api.ops.docs import bp as docs_bp
from gerdsen_ai_server.api.realtime import close_websockets, init_realtime, socketio
from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.backends.choice import choose
from gerdsen_ai_server.engine.benchmark import BenchmarkStore
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.monitoring.monitor import Monitor
from gerdsen_ai_server.monitoring.probes import probe_for_this_machine
from gerdsen_ai_server.monitoring.prometheus import Metrics
from gerdsen_ai_server.services import Services, init_services, services
from gerdsen_ai_server.serving.response_store import ResponseStore
from gerdsen_ai_server.serving.running import RequestTable
from gerdsen_ai_server.web.errors import register_error_handlers
from gerdsen_ai_server.web.guard import init_guard
from gerdsen_ai_server.web.request_log import configure_logging, init_request_log
from gerdsen_ai_server.web.request_metrics import init_request_metrics
from gerdsen_ai_server.web.security import init_security, trust_proxies
from gerdsen_ai_server.web.shutdown import init_shutdown

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | None = None, *, engine: InferenceEngine | None = None) -> Flask:
    settings = Settings.from_mapping(config)
    settings.check_profile()  # ProfileError: a production profile never serves openly beyond loopback
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]

    owned = engine is None
    if engine is None:
        engine = build_engine(settings, on_crash=_exit_worker)
        engine.start()
        atexit.register(engine.shutdown)

    monitor = Monitor(
        engine,
        probe_for_this_machine(settings.fault_thermal_state),
        engine.events,
        interval=settings.metrics_interval,
        thermal_interval=settings.thermal_interval,
        thermal_batch_size=settings.thermal_batch_size,
    )
    atexit.register(monitor.stop)
    init_services(
        app,
        Services(
            settings=settings,
            engine=engine,
            monitor=monitor,
            running=RequestTable(),
            responses=ResponseStore(settings.responses_store_bytes),
            benchmarks=BenchmarkStore(Path(engine.registry.models_dir) / ".impetus" / "benchmarks.json"),
        ),
    )

    register_error_handlers(app)
    init_request_log(app)  # first: every later hook and error already has the request id
    init_request_metrics(app, Metrics(engine, monitor))  # before security: refused requests are counted and timed too
    init_dashboard(app, settings.dashboard_path())  # before security: the page loads without a key, then asks
    init_security(app, settings)  # size limit, API keys, rate limits
    for bp in (openai_models.bp, completions.bp, chat.bp, embeddings.bp, responses.bp, anthropic.bp):
        app.register_blueprint(bp)  # /v1: OpenAI's API, then Anthropic's Messages
    app.register_blueprint(tokenize_routes.bp)  # /tokenize, /detokenize, /apply-template: at the root, as vLLM
    app.register_blueprint(rerank_routes.bp)  # /v1/rerank, /rerank, /v1/reranking (llama-server's alias)
    app.register_blueprint(health.bp)
    app.register_blueprint(admin_models.bp)  # /api/models: list, load, unload, benchmark
    app.register_blueprint(admin_presets.bp)  # /api/presets (writes: admin scope, web/keys.py)
    app.register_blueprint(server_config.bp)  # /api/config, for the dashboard
    app.register_blueprint(hardware.bp)
    app.register_blueprint(admin_requests.bp)  # GET/DELETE /api/requests (admin scope: web/keys.py)
    pulls.init_pulls(app)
    app.register_blueprint(pulls.bp)  # /api/models/pull, /pulls, /discover, DELETE /api/models/<id>
    init_realtime(app)  # starts the monitor's loop as a Socket.IO background task
    app.register_blueprint(metrics_route.bp)  # /metrics
    app.register_blueprint(docs_bp)  # /openapi.json, /docs
    # SIGTERM: not ready, finish running requests (gunicorn_conf installs it), then close the WebSockets
    init_shutdown(app).on_drained(close_websockets)
    # Outside Socket.IO's middleware, so it covers both: Host allow-list, Socket.IO's Origin, key,
    # rate limit and caps before any Engine.IO session exists.
    init_guard(app, settings, socketio.server.eio)
    trust_proxies(app, settings)  # last: wraps every middleware, so all of them see the client's address

    if owned and settings.default_model:
        _load_default(app, engine, settings.default_model)
    return app


def build_engine(settings: Settings, on_crash: Callable[[], None] | None = None) -> InferenceEngine:
    """An engine as ``settings`` describe it, not started yet. ``create_app`` builds its own with
    ``on_crash=_exit_worker``; a caller that owns one (the in-process tests) picks its own."""
    return InferenceEngine(EngineOptions.from_settings(settings), on_crash=on_crash)


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
            services(app).load_error = str(exc)
            log.error("default model %s failed to load: %s", spec, exc)
        else:
            loaded = future.result()
            log.info(
                "model %s ready on %s (%s)", loaded.model_id, loaded.backend, choose(engine.options.backend).line()
            )

    # trusted: the operator named it (--model, IMPETUS_DEFAULT_MODEL), so any path on the host may load
    engine.load_model(spec, keep_alive=math.inf, pinned=True, trusted=True).add_done_callback(done)
