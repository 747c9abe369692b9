"""Who may call the server, and how much: bearer-key auth, the request size limit, rate limits.

``init_security(app, settings)`` wires it all as ``before_request`` hooks, from ``create_app``.

* Auth: with ``IMPETUS_API_KEYS`` / ``IMPETUS_API_KEY_FILE`` set, every request needs
  ``Authorization: Bearer KEY`` (or Anthropic's ``x-api-key: KEY``, which its SDK sends). Keys are
  compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key, so the time
  taken says nothing about which key, or how much of one, matched. Probes stay open so an
  orchestrator needs no secret; ``/health`` and ``/metrics`` too unless ``IMPETUS_PROTECT_HEALTH``.
* Size: Flask's ``MAX_CONTENT_LENGTH``; Werkzeug refuses a larger body (declared or streamed) with
  413, which ``api/errors.py`` turns into the error envelope.
* Rate limits (flask-limiter, ``IMPETUS_RATE_LIMIT``): one budget per API key, or per client IP for
  requests without a valid key (so failed logins count too), shared by every route but the probes,
  monitoring and docs; a Socket.IO ``generate`` spends the same budget (``spend_budget``). Counters live in memory, or in Redis (``IMPETUS_REDIS_URL``) so that replicas
  share them. Every limited response carries OpenAI's ``x-ratelimit-*-requests`` headers; a 429 also
  ``Retry-After``. A storage outage fails open to in-memory counters rather than refusing traffic.
* Proxies: ``IMPETUS_TRUSTED_PROXIES`` hops of ``X-Forwarded-For`` are believed (Werkzeug's ProxyFix),
  so that rate limits and logs see the client's address behind a load balancer, not the balancer's.
* Browsers: security headers on every response (no sniffing, no framing, no referrer, a CSP that
  allows only same-origin scripts, styles, images and connections: a JSON API plus the docs page
  and a future same-origin dashboard); CORS (flask-cors) only for ``IMPETUS_CORS_ORIGINS``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time

from flask import Flask, Response, current_app, g, request
from flask_cors import CORS
from flask_limiter import Limiter, RateLimitExceeded
from werkzeug.middleware.proxy_fix import ProxyFix

from .api.errors import APIError, error_response
from .config import Settings

log = logging.getLogger(__name__)

# Kubernetes-style probes: never behind a key, a rate limit or the shutdown drain.
PROBE_PATHS = frozenset({"/health/live", "/health/ready"})
MONITORING_PATHS = frozenset({"/health", "/metrics"})
# The API description and its viewer hold nothing secret; a client needs them to learn the API.
DOCS_PATHS = frozenset({"/openapi.json", "/docs"})
DOCS_PREFIX = "/docs/"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyChecker:
    """The configured keys, held only as digests."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def matches(self, key: str) -> bool:
        given = _digest(key)
        found = False
        for digest in self._digests:  # no early exit: every key is compared every time
            found |= hmac.compare_digest(given, digest)
        return found


def presented_key() -> str | None:
    """The key the client sent, if any: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip() or None


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key: for rate-limit buckets and logs, never the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def is_open(path: str, settings: Settings) -> bool:
    if path in PROBE_PATHS or path in DOCS_PATHS or path.startswith(DOCS_PREFIX):
        return True
    return path in MONITORING_PATHS and not settings.protect_health


def identify(checker: KeyChecker) -> None:
    """First hook: remember a valid key (by id) for the rate limiter, the auth check and the logs."""
    key = presented_key()
    if key is not None and checker and checker.matches(key):
        g.api_key_id = key_id(key)


def authenticate(settings: Settings) -> None:
    """Refuse a request without a valid key, unless its path is open."""
    if g.get("api_key_id") is not None:
        return
    # CORS preflights carry no credentials by design; flask-cors answers them.
    if request.method == "OPTIONS" or is_open(request.path, settings):
        return
    if presented_key() is None:
        message = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                   "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    else:
        message = "Incorrect API key provided."
    raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ---- rate limits -----------------------------------------------------------------------------


def bucket(key: str | None, remote: str | None) -> str:
    return f"key:{key}" if key else f"ip:{remote or 'unknown'}"


def rate_key() -> str:
    return bucket(g.get("api_key_id"), request.remote_addr)


def spend_budget(key: str | None, remote: str | None) -> None:
    """Count one request against the rate limit for work that arrives outside an HTTP request (a
    Socket.IO ``generate``): the same bucket the HTTP API spends, per key or else per address.
    The counters are flask-limiter's own (its application limits are shared, scope "global")."""
    limiter: Limiter | None = current_app.extensions.get("impetus_limiter")
    if limiter is None:
        return
    from limits import parse_many

    args = [LIMIT_PREFIX, bucket(key, remote), "global"]
    try:
        for item in parse_many(current_app.config["IMPETUS_SETTINGS"].rate_limit):
            if not limiter.limiter.hit(item, *args):
                reset = limiter.limiter.get_window_stats(item, *args).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                who = "this API key" if key else "this client address"
                raise APIError(429, f"Rate limit reached for {who}: {item}. Please try again in {wait}s.",
                               code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
    except APIError:
        raise
    except Exception:  # storage unreachable: fail open, as the HTTP limiter does
        log.warning("rate-limit storage unreachable; not counting a Socket.IO request", exc_info=True)


def rate_exempt() -> bool:
    path = request.path
    return (request.method == "OPTIONS" or path in PROBE_PATHS or path in MONITORING_PATHS or path in DOCS_PATHS
            or path.startswith(DOCS_PREFIX))


LIMIT_PREFIX = "impetus"


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``."""
    whole = max(0, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def init_rate_limits(app: Flask, settings: Settings) -> Limiter:
    limiter = Limiter(
        key_func=rate_key,
        application_limits=[settings.rate_limit],
        storage_uri=settings.redis_url or "memory://",
        # A Redis that hangs (a partition, a paused server) must not hold every request: after this
        # long the counters fail open to memory, as they do when it refuses connections.
        storage_options={"socket_timeout": 1, "socket_connect_timeout": 1} if settings.redis_url else {},
        strategy="fixed-window",
        key_prefix=LIMIT_PREFIX,
        headers_enabled=False,  # ours below, named as OpenAI's
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.request_filter(rate_exempt)
    limiter.init_app(app)

    def seconds_to_reset() -> float:
        current = limiter.current_limit
        return 0.0 if current is None else max(0.0, current.window[0] - time.time())

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded) -> Response:
        wait = max(1, math.ceil(seconds_to_reset()))
        who = "this API key" if g.get("api_key_id") else "this client address"
        return error_response(APIError(
            429, f"Rate limit reached for {who}: {exc.limit.limit}. Please try again in {wait}s.",
            code="rate_limit_exceeded", headers={"Retry-After": str(wait)},
        ))

    @app.after_request
    def _rate_headers(response: Response) -> Response:
        current = limiter.current_limit
        if current is not None:
            try:
                remaining = current.remaining
            except Exception:  # storage unreachable: the request was served, skip the headers
                return response
            response.headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
            response.headers["x-ratelimit-remaining-requests"] = str(remaining)
            response.headers["x-ratelimit-reset-requests"] = duration(seconds_to_reset())
        return response

    return limiter


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_keys(settings: Settings) -> KeyChecker:
    try:
        keys = settings.api_key_list()
    except OSError as exc:
        raise RuntimeError(f"IMPETUS_API_KEY_FILE cannot be read: {exc}") from None
    if settings.api_key_file is not None and not keys:
        # Someone asked for auth and got none: refuse to start rather than serve openly.
        raise RuntimeError(f"IMPETUS_API_KEY_FILE {settings.api_key_file} holds no keys")
    return KeyChecker(keys)


def trust_proxies(app: Flask, settings: Settings) -> None:
    """Behind a load balancer every request comes from the balancer's address; with
    ``IMPETUS_TRUSTED_PROXIES=N`` the client's own is read from ``X-Forwarded-For``, N hops back
    (and the scheme and host from ``X-Forwarded-Proto`` / ``-Host``). Only the last N entries are
    believed: a client cannot pick its own rate-limit bucket by sending the header itself. Without
    the setting the headers are ignored. Wraps the whole WSGI app, Socket.IO's middleware included."""
    n = settings.trusted_proxies
    if n:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]


# ---- browsers ----------------------------------------------------------------------------------

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",  # Swagger UI and React set inline styles
    "img-src 'self' data:",
    "font-src 'self' data:",
    "connect-src 'self'",  # the API and Socket.IO, same origin (ws: included)
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cross-Origin-Opener-Policy": "same-origin",
}
# What a browser client may send and read across origins (OpenAI's and Anthropic's SDKs included).
CORS_ALLOW_HEADERS = ["Authorization", "Content-Type", "X-Request-ID", "x-api-key", "anthropic-version",
                      "OpenAI-Organization", "OpenAI-Project", "X-Stainless-.*"]
CORS_EXPOSE_HEADERS = ["X-Request-ID", "Retry-After", "x-ratelimit-limit-requests",
                       "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def init_browser_policy(app: Flask, settings: Settings) -> None:
    app.after_request(add_security_headers)
    origins = settings.cors_origin_list()
    if origins:
        CORS(app, origins="*" if "*" in origins else origins, allow_headers=CORS_ALLOW_HEADERS,
             expose_headers=CORS_EXPOSE_HEADERS, supports_credentials=False, max_age=600)


def init_security(app: Flask, settings: Settings) -> None:
    """The order of the hooks matters: identify the key, count the request, then refuse it if need be."""
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    init_browser_policy(app, settings)
    checker = load_keys(settings)
    app.before_request(lambda: identify(checker))
    if settings.rate_limit:
        app.extensions["impetus_limiter"] = init_rate_limits(app, settings)
    if checker:
        app.before_request(lambda: authenticate(settings))
    elif not is_loopback(settings.host):
        log.warning(
            "\n" + "!" * 78 + "\n"
            "!! Impetus is listening on %s with NO API KEY: anyone who can reach this address can use it.\n"
            "!! Set IMPETUS_API_KEYS (or IMPETUS_API_KEY_FILE), or bind 127.0.0.1.\n" + "!" * 78,
            settings.host,
        )
