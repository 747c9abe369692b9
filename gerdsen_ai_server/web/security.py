"""Who may call the server, and how much: bearer-key auth, the request size limit, rate limits.

``init_security(app, settings)`` wires it all as ``before_request`` hooks, from ``create_app``.

* Auth: with ``IMPETUS_API_KEYS`` / ``IMPETUS_ADMIN_KEYS`` / ``IMPETUS_API_KEY_FILE`` set, every
  request needs ``Authorization: Bearer KEY`` (or Anthropic's ``x-api-key: KEY``, which its SDK sends).
  Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key, so
  the time taken says nothing about which key, or how much of one, matched. Keys shorter than
  ``MIN_KEY_LENGTH`` characters stop the start: a short key is guessed, limits or not. Probes stay
  open so an orchestrator needs no secret; ``/health`` and ``/metrics`` too unless
  ``IMPETUS_PROTECT_HEALTH``, and an open ``/health`` then shows no host path, load error or PID to a
  caller without a valid key (``may_see_details``).
* Scopes: a key is an inference key or an admin key. Admin keys come from ``IMPETUS_ADMIN_KEYS``, or
  from key-file lines ``KEY admin`` (a line ``KEY`` or ``KEY inference`` is an inference key). Admin
  keys may do everything; inference keys get 403 ``insufficient_scope`` on management. What counts
  as management is decided by path, before routing, so that a new route is covered without anyone
  remembering: every request under ``/api/`` that is not GET/HEAD/OPTIONS (load, unload, pull,
  cancel a pull, delete, benchmark, and whatever is added there), plus the reads in
  ``ADMIN_READS`` (``/api/config``, ``/api/requests``). With no key configured at all, everything
  stays open to the loopback user, as before.
* Key guessing: every failed authentication (a wrong key where one is needed) spends the client
  address's failed-login budget (``IMPETUS_AUTH_FAIL_LIMIT``, 20 a minute by default, counted
  in a moving window whether or not a route matched and whether or not ``IMPETUS_RATE_LIMIT`` is set).
  Once it is spent, every request from that address that needs a key gets 429, right keys included,
  until the window lets it go (fail2ban's ban, not a per-key limit: otherwise 429 for a wrong key and
  200 for a right one would still answer every guess). The check runs before routing, so an unknown
  path with a wrong key is 401, never a 404 that a right key would also get.
* Content type: a POST/PUT/PATCH/DELETE under ``/v1/`` or ``/api/`` that carries a body, or declares
  a content type, must declare JSON (``application/json``, parameters allowed, or
  ``application/*+json``), else 415 ``unsupported_media_type`` before any view runs. A web page can
  send ``text/plain``, form and multipart bodies to any address without a CORS preflight; it cannot
  send ``application/json`` without one, and the preflight fails unless ``IMPETUS_CORS_ORIGINS`` lets
  that page in (FastAPI, and so vLLM, refuses non-JSON bodies the same way). Besides, an unsafe
  request that a browser sends from another origin (``Sec-Fetch-Site: cross-site|same-site``, or
  without that header an ``Origin`` that is not this host) gets 403 ``cross_origin_request`` unless
  ``IMPETUS_CORS_ORIGINS`` allows the origin: Go's ``http.CrossOriginProtection``. It closes what the
  content type cannot: a page's body-less ``fetch(url, {method: "POST", mode: "no-cors"})`` starting a
  benchmark on the loopback server. Clients that are not browsers send neither header and pass.
* Size: Flask's ``MAX_CONTENT_LENGTH``; Werkzeug refuses a larger body (declared or streamed) with
  413, which ``web/errors.py`` turns into the error envelope.
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, g, request
from flask_cors import CORS
from flask_limiter import Limiter, RateLimitExceeded
from werkzeug.middleware.proxy_fix import ProxyFix

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.web.errors import APIError, error_response

if TYPE_CHECKING:
    from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

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


def identify(checker: KeyChecker) -> None:
    """First hook: remember a valid key (by id, with its scope) for the rate limiter, the auth and
    scope checks and the logs."""
    key = presented_key()
    if key is not None and checker:
        scope = checker.scope(key)
        if scope is not None:
            g.api_key_id = key_id(key)
            g.api_key_scope = scope


def authenticate(settings: Settings) -> None:
    """Refuse a request without a valid key, unless its path is open; a wrong key spends the
    address's failed-login budget (a missing one guesses nothing: it spends only IMPETUS_RATE_LIMIT,
    so a dashboard polling before its user has typed the key does not lock that user out). Runs
    before routing's 404, so an unknown path answers a wrong key with 401 like any other."""
    if g.get("api_key_id") is not None or not needs_key(request.path, settings):
        return
    if presented_key() is None:
        message = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                   "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    else:
        failed_logins().fail(request.remote_addr)
        message = "Incorrect API key provided."
    raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ---- failed logins ---------------------------------------------------------------------------

FAILED_LOGINS = "impetus_failed_logins"


class FailedLogins:
    """Failed authentications per client address, in a moving window (``IMPETUS_AUTH_FAIL_LIMIT``).

    A moving window, not a fixed one: a fixed window lets twice the budget through across its
    boundary. Counted in Redis when ``IMPETUS_REDIS_URL`` is set (every replica sees the address's
    failures), else in memory; if Redis cannot be reached the counters fall back to memory, so an
    outage neither refuses everyone nor lets guessing run unlimited."""

    def __init__(self, limit: str, redis_url: str = "") -> None:
        from limits import parse_many
        from limits.storage import MemoryStorage, storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self.items = parse_many(limit) if limit.strip() else []
        self._memory = MovingWindowRateLimiter(MemoryStorage())
        self._shared = (MovingWindowRateLimiter(storage_from_string(redis_url, socket_timeout=1,
                                                                   socket_connect_timeout=1))
                        if redis_url else self._memory)

    def _run(self, call: Callable[[MovingWindowRateLimiter], Any]) -> Any:
        try:
            return call(self._shared)
        except Exception:  # storage unreachable: count in this process instead
            if self._shared is self._memory:
                raise
            log.warning("failed-login storage unreachable; counting in memory", exc_info=True)
            return call(self._memory)

    def fail(self, remote: str | None) -> None:
        """Count one failed authentication from ``remote``."""
        for item in self.items:
            self._run(lambda limiter, item=item: limiter.hit(item, FAILED_LOGINS, remote or "unknown"))

    def wait(self, remote: str | None) -> int:
        """Seconds until ``remote`` may try again: 0 while its budget lasts."""
        ids = (FAILED_LOGINS, remote or "unknown")
        for item in self.items:
            if not self._run(lambda limiter, item=item: limiter.test(item, *ids)):
                stats = self._run(lambda limiter, item=item: limiter.get_window_stats(item, *ids))
                return max(1, math.ceil(stats.reset_time - time.time()))
        return 0

    def refuse_if_locked_out(self, remote: str | None) -> None:
        """429 for an address whose failed-login budget is spent (a Socket.IO handshake asks too)."""
        wait = self.wait(remote)
        if wait:
            raise APIError(429, "Too many failed authentications from this client address "
                           f"(IMPETUS_AUTH_FAIL_LIMIT). Please try again in {wait}s.",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)})


def failed_logins() -> FailedLogins:
    return current_app.extensions[FAILED_LOGINS]


def refuse_locked_out(settings: Settings) -> None:
    """Before anything else that needs a key: an address that failed too often is refused whatever
    it presents now, a right key included; a right key answered differently would confirm a guess."""
    if needs_key(request.path, settings):
        failed_logins().refuse_if_locked_out(request.remote_addr)


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


def authorize(checker: KeyChecker) -> None:
    """403 ``insufficient_scope`` when an inference key asks for management (after authenticate)."""
    if g.get("api_key_scope") == ADMIN or not needs_admin(request.method, request.path):
        return
    if g.get("api_key_id") is None:
        return  # an open path; authenticate refused everything else
    hint = ("" if checker.has_admin else
            " No admin key is configured: set IMPETUS_ADMIN_KEYS, or mark a line of IMPETUS_API_KEY_FILE 'KEY admin'.")
    raise APIError(403, f"This API key may not manage the server: {request.method} {request.path} needs an admin "
                   f"key.{hint}", code="insufficient_scope")


def may_see_details() -> bool:
    """Whether this caller may see host details (absolute paths, the PID, load errors) on open
    monitoring routes: yes without keys configured (the local user), else only with a valid key."""
    checker: KeyChecker | None = current_app.extensions.get(KEYS)
    return not checker or g.get("api_key_id") is not None


# ---- browsers: content type and cross-origin writes ------------------------------------------

API_PREFIXES = ("/v1/", "/api/")


def has_body() -> bool:
    return (request.content_length or 0) > 0 or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def same_origin(origin: str) -> bool:
    """Whether ``Origin`` names this server, as the browser reached it (``Host``, scheme aside)."""
    host = origin.partition("://")[2]
    return bool(host) and host.lower() == request.host.lower()


def refuse_cross_origin(settings: Settings) -> None:
    """403 for a state-changing request that a browser sent from another origin not allowed by
    IMPETUS_CORS_ORIGINS (Go 1.25's CrossOriginProtection): Sec-Fetch-Site when the browser sends
    it, else Origin against Host. Non-browser clients send neither and pass."""
    if request.method in SAFE_METHODS or not request.path.startswith(API_PREFIXES):
        return
    site = request.headers.get("Sec-Fetch-Site", "").lower()
    origin = request.headers.get("Origin", "")
    if site in ("same-origin", "none"):  # the page itself, or the user typing the address
        return
    if not site and (not origin or same_origin(origin)):  # an older browser, or no browser at all
        return
    allowed = settings.cors_origin_list()
    if "*" in allowed or (origin and origin in allowed):
        return
    raise APIError(403, "Cross-origin request refused: this server takes state-changing requests from its own "
                   "pages, and from the origins in IMPETUS_CORS_ORIGINS.", code="cross_origin_request")


def require_json() -> None:
    """415 for a state-changing API request whose body (or declared content type) is not JSON: the
    simple bodies a web page can send anywhere without a preflight (text/plain, forms) never reach
    a view, however lenient its parser."""
    if request.method in SAFE_METHODS or not request.path.startswith(API_PREFIXES):
        return
    if not has_body() and "Content-Type" not in request.headers:
        return  # nothing to misread: e.g. POST /api/models/<id>/benchmark with defaults
    if request.is_json:  # application/json (any parameters) or application/*+json
        return
    given = request.mimetype or "no Content-Type"
    raise APIError(415, f"Unsupported Content-Type '{given}': send the body as JSON with "
                   "'Content-Type: application/json'.", code="unsupported_media_type")


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


KEYS = "impetus_keys"
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
            raise RuntimeError(f"IMPETUS_API_KEY_FILE {path} line {number}: expected 'KEY', 'KEY inference' or "
                               "'KEY admin'")
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
                raise RuntimeError(f"{source} holds a key of {len(key)} characters; API keys need at least "
                                   f"{MIN_KEY_LENGTH}, so that they cannot be guessed ({KEY_HINT})")
    return KeyChecker(inference, admin)


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
    """The order of the hooks matters: identify the key, refuse a locked-out address, count the
    request, refuse it without a valid key, then check its scope, its origin and its content type.
    All of them run before routing's 404/405, so the answer for an unknown path says nothing a
    known one would not."""
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    init_browser_policy(app, settings)
    checker = load_keys(settings)
    app.extensions[KEYS] = checker
    app.extensions[FAILED_LOGINS] = FailedLogins(settings.auth_fail_limit, settings.redis_url)
    app.before_request(lambda: identify(checker))
    if checker:
        app.before_request(lambda: refuse_locked_out(settings))
    if settings.rate_limit:
        app.extensions["impetus_limiter"] = init_rate_limits(app, settings)
    if checker:
        app.before_request(lambda: authenticate(settings))
        app.before_request(lambda: authorize(checker))
        if not checker.has_admin:  # a choice, not a mistake: management then happens by restart or CLI
            log.info("No admin key is configured (IMPETUS_ADMIN_KEYS, or 'KEY admin' in IMPETUS_API_KEY_FILE): "
                        "loading, unloading, pulling and deleting models and /api/config are refused to every key.")
    elif not is_loopback(settings.host):
        log.warning(
            "\n" + "!" * 78 + "\n"
            "!! Impetus is listening on %s with NO API KEY: anyone who can reach this address can use it.\n"
            "!! Set IMPETUS_API_KEYS (or IMPETUS_API_KEY_FILE), or bind 127.0.0.1.\n" + "!" * 78,
            settings.host,
        )
    app.before_request(lambda: refuse_cross_origin(settings))
    app.before_request(require_json)
