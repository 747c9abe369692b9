"""The app's services, found through one typed accessor instead of string keys in ``app.extensions``.

``create_app`` builds one ``Services`` and binds it to the app (``init_services``); a route, a hook
or a Socket.IO handler asks ``services()`` for what it needs (``services().engine``), as vLLM's
routers find their serving objects through one accessor. Fields filled by a later part of the
factory (the web layer's key checker, limiter, drain) start as ``None`` and are set by their
``init_*`` function; ``require`` names the missing one instead of an AttributeError deep in a hook.

The web and serving layers' types are imported for annotations only (``TYPE_CHECKING``): this
module sits below serving/, web/ and api/ (see tests/unit/test_layers.py), and a type hint is no
runtime dependency; ``create_app`` builds those objects and hands them in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, current_app
from flask.sansio.app import App

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.benchmark import BenchmarkStore
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.monitoring.monitor import Monitor
from gerdsen_ai_server.monitoring.prometheus import Metrics
from gerdsen_ai_server.store.pulls import PullManager

if TYPE_CHECKING:
    from flask_limiter import Limiter

    from gerdsen_ai_server.serving.response_store import ResponseStore
    from gerdsen_ai_server.serving.running import RequestTable
    from gerdsen_ai_server.web.errors import Renderer
    from gerdsen_ai_server.web.failed_logins import FailedLogins
    from gerdsen_ai_server.web.keys import KeyChecker
    from gerdsen_ai_server.web.shutdown import Drain

EXTENSION = "impetus"
T = TypeVar("T")


@dataclass
class Services:
    """Everything a request handler may reach, typed. One per app."""

    settings: Settings
    engine: InferenceEngine
    monitor: Monitor | None = None
    metrics: Metrics | None = None
    pulls: PullManager | None = None
    benchmarks: BenchmarkStore | None = None
    running: RequestTable | None = None  # the requests in flight (serving/running.py)
    responses: ResponseStore | None = None  # stored /v1/responses (serving/response_store.py)
    keys: KeyChecker | None = None
    failed_logins: FailedLogins | None = None
    limiter: Limiter | None = None
    drain: Drain | None = None
    dashboard_dir: Path | None = None
    hub_search_slots: threading.BoundedSemaphore | None = None
    error_shapes: dict[str, Renderer] = field(
        default_factory=dict
    )  # path prefix -> its API's error shape (web/errors.py)
    load_error: str | None = None  # why the default model failed to load (readiness says so)
    extra: dict[str, Any] = field(default_factory=dict)  # tests and plugins only; the server's own services are fields


def init_services(app: Flask, services: Services) -> Services:
    app.extensions[EXTENSION] = services
    return services


def services(app: App | None = None) -> Services:
    """The services of ``app`` (default: the app handling this request or context)."""
    found = (app or current_app).extensions[EXTENSION]
    if not isinstance(found, Services):
        raise RuntimeError("create_app binds Services with init_services")
    return found


def require(value: T | None, name: str) -> T:
    """``value``, or a RuntimeError naming the service that create_app has not set up."""
    if value is None:
        raise RuntimeError(f"service {name!r} is not set up in this app (see app.py create_app)")
    return value
