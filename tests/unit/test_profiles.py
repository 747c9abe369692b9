"""IMPETUS_PROFILE: each profile's defaults, an explicit setting always winning, and production refusing to
serve openly beyond loopback (Settings, create_app and `impetus serve`, which must refuse before any model)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from gerdsen_ai_server.config import PROFILE_DEFAULTS, ProfileError, Settings, is_loopback_host

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 24  # long enough for load_keys (16 characters at least)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings reads IMPETUS_* from the environment: start each test from none of them."""
    for name in [n for n in os.environ if n.startswith("IMPETUS_")]:
        monkeypatch.delenv(name)
    yield


def test_development_is_the_default_and_changes_nothing() -> None:
    settings = Settings()
    assert settings.profile == "development"
    assert PROFILE_DEFAULTS["development"] == {}
    assert (settings.log_format, settings.protect_health, settings.rate_limit) == ("text", False, "")
    assert settings.model_fields_set == set()


def test_production_fills_its_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPETUS_PROFILE", "production")
    settings = Settings()
    assert settings.log_format == "json"
    assert settings.protect_health is True
    assert settings.rate_limit == "600/minute"
    assert {name: getattr(settings, name) for name in PROFILE_DEFAULTS["production"]} == PROFILE_DEFAULTS["production"]
    # The profile's values are defaults, not choices: only the profile itself was set explicitly.
    assert settings.model_fields_set == {"profile"}


def test_an_explicit_environment_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPETUS_PROFILE", "production")
    monkeypatch.setenv("IMPETUS_LOG_FORMAT", "text")
    monkeypatch.setenv("IMPETUS_PROTECT_HEALTH", "false")
    monkeypatch.setenv("IMPETUS_RATE_LIMIT", "")  # set, and empty: production's limit turned off
    settings = Settings()
    assert (settings.log_format, settings.protect_health, settings.rate_limit) == ("text", False, "")


def test_an_explicit_mapping_setting_wins() -> None:
    """create_app's mapping counts as explicit too; fields it leaves out still take the profile's value."""
    settings = Settings.from_mapping({"profile": "production", "rate_limit": "5/second"})
    assert settings.rate_limit == "5/second"
    assert settings.log_format == "json" and settings.protect_health is True


def test_an_unknown_profile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPETUS_PROFILE", "staging")
    with pytest.raises(ValidationError, match="profile"):
        Settings()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"])
def test_production_on_loopback_needs_nothing(host: str) -> None:
    assert is_loopback_host(host)
    Settings(profile="production", host=host).check_profile()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "llm.example.com"])
def test_production_beyond_loopback_needs_keys_and_hosts(host: str) -> None:
    assert not is_loopback_host(host)
    with pytest.raises(ProfileError) as refused:
        Settings(profile="production", host=host).check_profile()
    assert "IMPETUS_API_KEYS" in str(refused.value) and "IMPETUS_ALLOWED_HOSTS" in str(refused.value)
    Settings(profile="production", host=host, api_keys=KEY, allowed_hosts="llm.example.com").check_profile()
    Settings(profile="development", host=host).check_profile()  # development: a warning at start, no refusal


def test_each_missing_requirement_is_named_alone_and_no_key_is_shown(tmp_path: Path) -> None:
    no_hosts = Settings(profile="production", host="0.0.0.0", admin_keys=KEY).profile_problems()
    assert len(no_hosts) == 1 and "IMPETUS_ALLOWED_HOSTS" in no_hosts[0]
    with pytest.raises(ProfileError) as refused:
        Settings(profile="production", host="0.0.0.0", api_keys=KEY).check_profile()
    assert KEY not in str(refused.value)

    no_keys = Settings(profile="production", host="0.0.0.0", api_keys=" , ", allowed_hosts="*").profile_problems()
    assert len(no_keys) == 1 and "IMPETUS_API_KEYS" in no_keys[0]  # commas alone are no key
    key_file = tmp_path / "keys"
    assert not Settings(
        profile="production", host="0.0.0.0", api_key_file=key_file, allowed_hosts="*"
    ).profile_problems()  # the file itself is checked by load_keys


def test_create_app_refuses_before_building_an_engine() -> None:
    from gerdsen_ai_server.app import create_app

    started = time.monotonic()
    with pytest.raises(ProfileError, match="IMPETUS_API_KEYS"):
        create_app({"profile": "production", "host": "0.0.0.0", "default_model": "/nonexistent/model"})
    assert time.monotonic() - started < 5


def test_serve_refuses_production_on_all_addresses_without_keys() -> None:
    """`impetus serve` stops before Gunicorn starts (nothing printed on stdout, no model loaded), exit 2."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("IMPETUS_")}, "IMPETUS_PROFILE": "production"}
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gerdsen_ai_server.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--model",
            "/nonexistent/model",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "IMPETUS_PROFILE=production refuses to start on 0.0.0.0" in result.stderr
    assert "IMPETUS_API_KEYS" in result.stderr and "IMPETUS_ALLOWED_HOSTS" in result.stderr
    assert result.stdout == ""  # the start banner comes only after the check
    assert time.monotonic() - started < 30


def test_gunicorn_logs_json_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile reaches Gunicorn's own configuration too, not only the app."""
    import importlib

    import gerdsen_ai_server.cli.gunicorn_conf as conf

    monkeypatch.setenv("IMPETUS_PROFILE", "production")
    try:
        assert importlib.reload(conf).logger_class.endswith("JsonLogger")
        monkeypatch.setenv("IMPETUS_LOG_FORMAT", "text")
        assert importlib.reload(conf).logger_class == "gunicorn.glogging.Logger"
    finally:
        monkeypatch.undo()
        importlib.reload(conf)


def test_the_profiles_table_in_the_docs_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    block = text[text.index(gen.PROFILES_BEGIN) + len(gen.PROFILES_BEGIN) : text.index(gen.PROFILES_END)]
    assert block.strip() == gen.profiles_table(), "stale: run .venv/bin/python scripts/gen_config_docs.py"
    assert "| `IMPETUS_RATE_LIMIT` | (empty) | `600/minute` |" in block
