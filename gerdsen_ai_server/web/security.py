"""Who may call the server, and how much: the auth hooks, wired in order (``init_security``).

``init_security(app, settings)`` wires it all as ``before_request`` hooks, from ``create_app``; the
parts live beside it: keys.py (keys, scopes, open paths), failed_logins.py (the lockout),
rate_limits.py, request_checks.py (JSON bodies, cross-origin writes, browser headers, CORS).

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
* Content type, cross-origin writes, security headers and CORS: request_checks.py.
* Size: Flask's ``MAX_CONTENT_LENGTH``; Werkzeug refuses a larger body (declared or streamed) with
  413, which ``web/errors.py`` turns into the error envelope.
* Rate limits (flask-limiter, ``IMPETUS_RATE_LIMIT``): rate_limits.py. One budget per API key, or
  per client IP for requests without a valid key (so failed logins count too), shared by every route
  but the probes, monitoring and docs; a Socket.IO ``generate`` spends the same budget.
* Proxies: ``IMPETUS_TRUSTED_PROXIES`` hops of ``X-Forwarded-For`` are believed (Werkzeug's ProxyFix),
  so that rate limits and logs see the client's address behind a load balancer, not the balancer's.

The key checker, the failed-login counters and the limiter go into the app's services
(``services().keys``, ``.failed_logins``, ``.limiter``), where the Socket.IO guard and channel and
the health routes find them.
"""

from __future__ import annotations

import logging

from flask import Flask, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from gerdsen_ai_server.config import Settings, is_loopback_host
from gerdsen_ai_server.services import services
from gerdsen_ai_server.web.errors import APIError
from gerdsen_ai_server.web.failed_logins import FailedLogins
from gerdsen_ai_server.web.keys import ADMIN, KeyChecker, key_id, load_keys, needs_admin, needs_key, presented_key
from gerdsen_ai_server.web.rate_limits import init_rate_limits
from gerdsen_ai_server.web.request_checks import init_browser_policy, refuse_cross_origin, require_json

log = logging.getLogger(__name__)


def identify(checker: KeyChecker) -> None:
    """First hook: remember a valid key (by id, with its scope) for the rate limiter, the auth and
    scope checks and the logs."""
    key = presented_key()
    if key is not None and checker:
        scope = checker.scope(key)
        if scope is not None:
            g.api_key_id = key_id(key)
            g.api_key_scope = scope


def authenticate(settings: Settings, logins: FailedLogins) -> None:
    """Refuse a request without a valid key, unless its path is open; a wrong key spends the
    address's failed-login budget (a missing one guesses nothing: it spends only IMPETUS_RATE_LIMIT,
    so a dashboard polling before its user has typed the key does not lock that user out). Runs
    before routing's 404, so an unknown path answers a wrong key with 401 like any other."""
    if g.get("api_key_id") is not None or not needs_key(request.path, settings):
        return
    if presented_key() is None:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        logins.fail(request.remote_addr)
        message = "Incorrect API key provided."
    raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def refuse_locked_out(settings: Settings, logins: FailedLogins) -> None:
    """Before anything else that needs a key: an address that failed too often is refused whatever
    it presents now, a right key included; a right key answered differently would confirm a guess."""
    if needs_key(request.path, settings):
        logins.refuse_if_locked_out(request.remote_addr)


def authorize(checker: KeyChecker) -> None:
    """403 ``insufficient_scope`` when an inference key asks for management (after authenticate)."""
    if g.get("api_key_scope") == ADMIN or not needs_admin(request.method, request.path):
        return
    if g.get("api_key_id") is None:
        return  # an open path; authenticate refused everything else
    hint = (
        ""
        if checker.has_admin
        else " No admin key is configured: set IMPETUS_ADMIN_KEYS, or mark a line of IMPETUS_API_KEY_FILE 'KEY admin'."
    )
    raise APIError(
        403,
        f"This API key may not manage the server: {request.method} {request.path} needs an admin key.{hint}",
        code="insufficient_scope",
    )


def may_see_details() -> bool:
    """Whether this caller may see host details (absolute paths, the PID, load errors) on open
    monitoring routes: yes without keys configured (the local user), else only with a valid key."""
    checker = services().keys
    return not checker or g.get("api_key_id") is not None


def trust_proxies(app: Flask, settings: Settings) -> None:
    """Behind a load balancer every request comes from the balancer's address; with
    ``IMPETUS_TRUSTED_PROXIES=N`` the client's own is read from ``X-Forwarded-For``, N hops back
    (and the scheme and host from ``X-Forwarded-Proto`` / ``-Host``). Only the last N entries are
    believed: a client cannot pick its own rate-limit bucket by sending the header itself. Without
    the setting the headers are ignored. Wraps the whole WSGI app, Socket.IO's middleware included."""
    n = settings.trusted_proxies
    if n:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]


def init_security(app: Flask, settings: Settings) -> None:
    """The order of the hooks matters: identify the key, refuse a locked-out address, count the
    request, refuse it without a valid key, then check its scope, its origin and its content type.
    All of them run before routing's 404/405, so the answer for an unknown path says nothing a
    known one would not."""
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    init_browser_policy(app, settings)
    checker = load_keys(settings)
    logins = FailedLogins(settings.auth_fail_limit, settings.redis_url)
    found = services(app)
    found.keys, found.failed_logins = checker, logins
    app.before_request(lambda: identify(checker))
    if checker:
        app.before_request(lambda: refuse_locked_out(settings, logins))
    if settings.rate_limit:
        found.limiter = init_rate_limits(app, settings)
    if checker:
        app.before_request(lambda: authenticate(settings, logins))
        app.before_request(lambda: authorize(checker))
        if not checker.has_admin:  # a choice, not a mistake: management then happens by restart or CLI
            log.info(
                "No admin key is configured (IMPETUS_ADMIN_KEYS, or 'KEY admin' in IMPETUS_API_KEY_FILE): "
                "loading, unloading, pulling and deleting models and /api/config are refused to every key."
            )
    elif not is_loopback_host(settings.host):
        log.warning(
            "\n" + "!" * 78 + "\n"
            "!! Impetus is listening on %s with NO API KEY: anyone who can reach this address can use it.\n"
            "!! Set IMPETUS_API_KEYS (or IMPETUS_API_KEY_FILE), or bind 127.0.0.1.\n" + "!" * 78,
            settings.host,
        )
    app.before_request(lambda: refuse_cross_origin(settings))
    app.before_request(require_json)
