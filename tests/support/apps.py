"""Flask apps built in the test process, without an engine: for the web layer's hooks alone."""

from __future__ import annotations

from typing import Any

from flask import Flask

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.services import Services, init_services
from gerdsen_ai_server.web.errors import register_error_handlers


def bare_app(**settings: Any) -> tuple[Flask, Settings]:
    """A Flask app with the services and the error envelope bound and no engine (no route reaches
    one); the caller adds the hooks under test and its own routes. Returns the app and its settings."""
    app = Flask(__name__)
    chosen = Settings(**{"default_model": "", **settings})
    init_services(app, Services(settings=chosen, engine=None))  # type: ignore[arg-type]  # hooks only: no engine
    register_error_handlers(app)
    return app, chosen
