"""GET /api/config: the settings in force, for the dashboard's Server page. Read-only; behind the API
key like the rest of /api. Keys and passwords never leave the server: a secret shows only whether it
is set (and how many keys), a URL loses its password."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flask import Blueprint, Response, current_app, jsonify

from ..config import Settings
from ..schemas.server import ConfigEntry, ConfigList

bp = Blueprint("server_config", __name__, url_prefix="/api")

SECRET_WORDS = ("keys", "token", "secret", "password")
MASK = "********"


def is_secret(name: str) -> bool:
    return any(word in name for word in SECRET_WORDS) or name.endswith("_key")


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def shown(name: str, value: Any) -> Any:
    if is_secret(name):
        if not value:
            return None
        count = len([k for k in str(value).split(",") if k.strip()])
        return f"{MASK} ({count} key{'s' if count != 1 else ''})" if name.endswith("keys") else MASK
    if isinstance(value, str) and "://" in value:
        return without_password(value)
    if isinstance(value, Path):
        return str(value)
    return value


def entries(settings: Settings) -> list[ConfigEntry]:
    prefix = Settings.model_config.get("env_prefix", "")
    return [
        ConfigEntry(name=name, env=f"{prefix}{name.upper()}", value=shown(name, getattr(settings, name)),
                    secret=is_secret(name), description=field.description)
        for name, field in Settings.model_fields.items()
    ]


@bp.get("/config")
def config() -> Response:
    settings: Settings = current_app.config["IMPETUS_SETTINGS"]
    return jsonify(ConfigList(data=entries(settings)).model_dump(mode="json"))
