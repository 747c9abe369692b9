"""API keys and their scopes: which key is which, which paths need one, which need an admin's.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key, so
the time taken says nothing about which key, or how much of one, matched. Keys shorter than
``MIN_KEY_LENGTH`` characters stop the start: a short key is guessed, limits or not. A key is an
inference key or an admin key: admin keys come from ``IMPETUS_ADMIN_KEYS``, or from key-file lines
``KEY admin`` (a line ``KEY`` or ``KEY inference`` is an inference key). What counts as management
is decided by path, before routing (``needs_admin``), so that a new route is covered without anyone
remembering. The hooks that use all this are security.py's.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from flask import request

from gerdsen_ai_server.config import Settings

# ---- which paths need a key -------------------------------------------------------------------

# Kubernetes-style probes: never behind a key, a rate limit or the shutdown drain.
PROBE_PATHS = frozenset({"/health/live", "/health/ready"})
MONITORING_PATHS = frozenset({"/health", "/metrics"})
# The API description and its viewer hold nothing secret; a client needs them to learn the API.
DOCS_PATHS = frozenset({"/openapi.json", "/docs"})
DOCS_PREFIX = "/docs/"

ADMIN = "admin"
INFERENCE = "inference"
SCOPES = (INFERENCE, ADMIN)
# Even 16 lowercase letters and digits hold ~82 bits: out of reach at IMPETUS_AUTH_FAIL_LIMIT's pace.
# A shorter key ("change-me", "test") is a password someone chose, and is guessed from a list.
MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyChecker:
    """The configured keys, held only as digests, each with its scope (inference or admin)."""

    def __init__(self, keys: list[str], admin_keys: list[str] | tuple[str, ...] = ()) -> None:
        scopes = {_digest(k): INFERENCE for k in keys}
        scopes.update({_digest(k): ADMIN for k in admin_keys})  # listed as both: the wider scope wins
        self._digests = list(scopes.items())

    def __bool__(self) -> bool:
        return bool(self._digests)

    def scope(self, key: str) -> str | None:
        """``"admin"``, ``"inference"``, or None for a key that is not configured."""
        given = _digest(key)
        found: str | None = None
        for digest, scope in self._digests:  # no early exit: every key is compared every time
            if hmac.compare_digest(given, digest):
                found = scope
        return found

    def matches(self, key: str) -> bool:
        """Whether ``key`` is any configured key, of either scope (Socket.IO's handshake asks this)."""
        return self.scope(key) is not None

    @property
    def has_admin(self) -> bool:
        return any(scope == ADMIN for _, scope in self._digests)


def key_in_headers(authorization: str, x_api_key: str) -> str | None:
    """The key in ``Authorization: Bearer KEY`` or else ``x-api-key: KEY``, if either holds one."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return x_api_key.strip() or None


def presented_key() -> str | None:
    """The key the client sent, if any: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    return key_in_headers(request.headers.get("Authorization", ""), request.headers.get("x-api-key", ""))


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key: for rate-limit buckets and logs, never the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def is_open(path: str, settings: Settings) -> bool:
    if path in PROBE_PATHS or path in DOCS_PATHS or path.startswith(DOCS_PREFIX):
        return True
    return path in MONITORING_PATHS and not settings.protect_health


def needs_key(path: str, settings: Settings) -> bool:
    """Whether this request must present a key (keys configured): CORS preflights carry no
    credentials by design (flask-cors answers them), and open paths need none."""
    return request.method != "OPTIONS" and not is_open(path, settings)


# ---- scopes ----------------------------------------------------------------------------------

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MANAGEMENT_PREFIX = "/api/"
# Reads that only an admin may make: settings (paths, limits), and other callers' running requests.
ADMIN_READS = ("/api/config", "/api/requests")


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def needs_admin(method: str, path: str) -> bool:
    """Management, by construction: every change under /api/ (a new POST or DELETE there is admin
    without anyone remembering to say so) and the reads in ``ADMIN_READS``. Not a CORS preflight,
    which carries no credentials by design."""
    if method == "OPTIONS" or not path.startswith(MANAGEMENT_PREFIX):
        return False
    return method not in SAFE_METHODS or any(under(path, read) for read in ADMIN_READS)


# ---- the configured keys -----------------------------------------------------------------------

KEY_HINT = "make one with: python -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(32))'"


def read_key_file(path: Path) -> tuple[list[str], list[str]]:
    """The inference and admin keys of a key file: one key a line, optionally followed by its scope
    (``KEY`` or ``KEY inference``, ``KEY admin``); blank lines and ``#`` comments are skipped."""
    inference: list[str] = []
    admin: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2 or (len(words) == 2 and words[1] not in SCOPES):
            # Never echo the line: it holds a key.
            raise RuntimeError(
                f"IMPETUS_API_KEY_FILE {path} line {number}: expected 'KEY', 'KEY inference' or 'KEY admin'"
            )
        (admin if words[1:] == [ADMIN] else inference).append(words[0])
    return inference, admin


def load_keys(settings: Settings) -> KeyChecker:
    """Every configured key with its scope; refuses to start on an unreadable or empty key file, a
    malformed line, or a key shorter than ``MIN_KEY_LENGTH`` (named by where it is, never shown)."""
    inference = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
    admin = [k.strip() for k in settings.admin_keys.split(",") if k.strip()]
    sources = [("IMPETUS_API_KEYS", inference), ("IMPETUS_ADMIN_KEYS", admin)]
    if settings.api_key_file is not None:
        try:
            from_file, admin_from_file = read_key_file(settings.api_key_file)
        except OSError as exc:
            raise RuntimeError(f"IMPETUS_API_KEY_FILE cannot be read: {exc}") from None
        if not from_file and not admin_from_file:
            # Someone asked for auth and got none: refuse to start rather than serve openly.
            raise RuntimeError(f"IMPETUS_API_KEY_FILE {settings.api_key_file} holds no keys")
        sources.append((f"IMPETUS_API_KEY_FILE {settings.api_key_file}", from_file + admin_from_file))
        inference, admin = inference + from_file, admin + admin_from_file
    for source, keys in sources:
        for key in keys:
            if len(key) < MIN_KEY_LENGTH:
                raise RuntimeError(
                    f"{source} holds a key of {len(key)} characters; API keys need at least "
                    f"{MIN_KEY_LENGTH}, so that they cannot be guessed ({KEY_HINT})"
                )
    return KeyChecker(inference, admin)
