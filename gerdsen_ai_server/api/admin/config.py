"""GET /api/config: the settings in force, for the dashboard's Server page. Read-only; with keys set,
an admin key's only (it names paths and limits). Keys and passwords never leave the server: a secret
shows only whether it is set (and how many keys); a URL loses its password wherever it is written:
the userinfo (``redis://user:PASSWORD@h``, or ``https://TOKEN@h`` where the user name is the secret)
and every query parameter whose name reads like a credential (``redis://h/0?password=x``,
``?token=``, ``?sig=``). A URL that does not even parse is masked whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from flask import Blueprint, Response, jsonify

from gerdsen_ai_server import __version__
from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.schemas.server import ConfigEntry, ConfigList
from gerdsen_ai_server.services import services

bp = Blueprint("server_config", __name__, url_prefix="/api")

SECRET_WORDS = ("keys", "token", "secret", "password")
MASK = "********"


def is_secret(name: str) -> bool:
    return any(word in name for word in SECRET_WORDS) or name.endswith("_key")


# Query parameters that carry credentials in connection URLs (redis-py's ``password``, cloud SAS
# ``sig``, ``access_token``, ``api_key``, ...): matched as parts of the name, case-insensitively.
SECRET_PARAMS = ("pass", "pwd", "secret", "token", "key", "auth", "cred", "sig")


def secret_param(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_PARAMS)


def without_password(url: str) -> str:
    """``url`` with its credentials masked: the userinfo's password (or a bare user name, which then
    is the secret) and the values of credential-like query parameters."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        user = parts.username or ""
        userinfo = f"{user}:{MASK}" if parts.password is not None else MASK
        netloc = f"{userinfo}@{host}" + (f":{port}" if port is not None else "")
    query = "&".join(
        f"{name}={MASK}" if secret_param(unquote_plus(name)) and sep else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&"))
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query if parts.query else ""))


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
        ConfigEntry(
            name=name,
            env=f"{prefix}{name.upper()}",
            value=shown(name, getattr(settings, name)),
            secret=is_secret(name),
            description=field.description,
        )
        for name, field in Settings.model_fields.items()
    ]


@bp.get("/config")
def config() -> Response:
    settings: Settings = services().settings
    return jsonify(ConfigList(data=entries(settings), version=__version__).model_dump(mode="json"))
