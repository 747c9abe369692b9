"""IMPETUS_PROFILE=production through the app's own wiring: /health and /metrics behind the key and the
rate limit on, unless set explicitly (tests/unit/test_profiles.py holds the Settings rules). log_format is
given as text here: create_app configures the process's logging, which the other in-process tests share."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from gerdsen_ai_server.services import services

KEY = "sk-profile-0123456789abcdef"
PRODUCTION = {"profile": "production", "api_keys": KEY, "log_format": "text"}


def test_production_protects_health_and_limits_rates(make_app: Callable[..., Flask]) -> None:
    app = make_app(**PRODUCTION)
    client = app.test_client()
    assert client.get("/health").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/health/live").status_code == 200  # the probes stay open
    assert client.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert services(app).limiter is not None  # 600/minute per key


def test_explicit_settings_win_over_production(make_app: Callable[..., Flask]) -> None:
    app = make_app(**PRODUCTION, protect_health=False, rate_limit="")
    assert app.test_client().get("/health").status_code == 200
    assert services(app).limiter is None


def test_development_leaves_health_open_and_rates_unlimited(make_app: Callable[..., Flask]) -> None:
    app = make_app(api_keys=KEY, log_format="text")
    assert app.test_client().get("/health").status_code == 200
    assert services(app).limiter is None
