"""WSGI guards in front of Flask *and* Socket.IO: what must hold before either sees a request.

Flask's hooks (security.py) never see ``/socket.io/``: Flask-SocketIO's Engine.IO middleware answers
it first. So the checks that must cover both live here, one WSGI layer outside that middleware and
inside ProxyFix (``security.trust_proxies`` wraps last, so the client's address and the forwarded
host are already in place):

* **Host allow-list** (DNS rebinding). A page on ``evil.example`` whose DNS name an attacker points at
  127.0.0.1 is same-origin with itself in the browser, so without this check it could drive a
  loopback server with no key. Every request, probes included, must name in ``Host`` one of:
  ``localhost``, any IP literal (an address cannot be re-bound; Jupyter allows local IPs the same
  way, and Kubernetes probes use the pod's IP), the bound host (``IMPETUS_HOST``), or an entry of
  ``IMPETUS_ALLOWED_HOSTS`` (``.example.com`` also allows its subdomains, as Django's
  ``ALLOWED_HOSTS``; ``*`` any). The port is ignored. Otherwise 421 ``host_not_allowed``: Misdirected
  Request, "this server does not answer for that name". A request without ``Host`` (HTTP/1.0, never
  a browser) passes.
* **Socket.IO's Origin**. Browsers let any page open a WebSocket anywhere and send its cookies;
  only ``Origin`` tells whose page it is. A handshake or poll whose ``Origin`` is not this server
  (same host and port as ``Host``) and not in ``IMPETUS_CORS_ORIGINS`` gets 403
  ``origin_not_allowed``. No ``Origin`` (python-socketio and other programs) passes: the key is what
  guards those.
* **The key in the Engine.IO handshake, before a session exists.** With keys configured, a request
  that would open a session (no ``sid``) needs a valid key: ``Authorization: Bearer KEY``,
  ``x-api-key: KEY``, or, because a browser cannot set headers on a WebSocket, the query parameter
  ``api_key=KEY`` (as Jupyter accepts ``?token=``; only on ``/socket.io/``; the request log writes
  paths without their query, and no Engine.IO request is logged with its URL). Else 401
  ``invalid_api_key``, and the failure spends the address's failed-login budget as over HTTP. The
  session id is the credential of every later request of that session.
* **Rate limit.** Every request that opens a session (or names one that does not exist) spends
  the caller's ``IMPETUS_RATE_LIMIT`` budget, per key or per address, like an HTTP request. The
  transport traffic of a live session (long-poll GETs, which the server paces, and POSTs) is not
  counted, as an SSE stream's chunks are not; each Socket.IO event is (api/realtime/channel.py).
* **Caps.** At most ``IMPETUS_MAX_SOCKET_SESSIONS`` Engine.IO sessions at once (503 beyond); at most
  half of Gunicorn's threads held by Socket.IO requests at once, WebSockets and long-polls alike (a
  WebSocket holds its thread for its whole life, a long-poll for up to 45 s); and one long-poll at a
  time per session (Engine.IO lets a client hold any number, each a thread). So HTTP requests and
  probes always find a thread, however many Socket.IO clients come.

Also here: a request body whose read timed out (``IMPETUS_READ_TIMEOUT``, http_worker.py) is answered
408 in the API's envelope instead of Flask's 500.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from flask import Flask, Response
from werkzeug.exceptions import ClientDisconnected

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.services import services
from gerdsen_ai_server.web.errors import APIError, error_response
from gerdsen_ai_server.web.keys import key_id, key_in_headers
from gerdsen_ai_server.web.rate_limits import spend_budget

log = logging.getLogger(__name__)

SOCKETIO_PREFIX = "/socket.io/"
KEY_QUERY = "api_key"  # the query parameter a browser's WebSocket handshake carries the key in
# What the guard tells the Socket.IO connect handler about the handshake (the session keeps its environ).
KEY_ID = "impetus.key_id"
KEY_SCOPE = "impetus.key_scope"

StartResponse = Callable[..., Any]


def host_name(host: str) -> str:
    """The name in a ``Host`` header, lower-cased, without port, brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostAllowList:
    """The names this server answers to (see the module's doc)."""

    def __init__(self, settings: Settings) -> None:
        self.any = False
        self.names = {"localhost"}
        self.suffixes: list[str] = []
        bound = host_name(settings.host)
        if bound and not is_ip_literal(bound):
            self.names.add(bound)  # an IP-literal bind is allowed anyway
        for entry in settings.allowed_host_list():
            if entry == "*":
                self.any = True
            elif entry.startswith("."):
                self.suffixes.append(entry.rstrip("."))
            else:
                self.names.add(host_name(entry))

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if self.any or name in self.names or is_ip_literal(name):
            return True
        return any(name == suffix[1:] or name.endswith(suffix) for suffix in self.suffixes)


DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def authority(scheme: str, netloc: str) -> str:
    """``host:port`` with the scheme's default port spelled out, so that ``http://h`` equals ``h:80``."""
    netloc = netloc.lower().rstrip("/")
    port_sep = netloc.rfind(":")
    if port_sep > netloc.rfind("]"):  # has a port
        return netloc
    return f"{netloc}:{DEFAULT_PORTS.get(scheme, '')}"


class OriginPolicy:
    """Whether a browser page's ``Origin`` may use Socket.IO: this server's own pages (Origin's
    host and port are the request's ``Host``), or an origin in ``IMPETUS_CORS_ORIGINS``."""

    def __init__(self, settings: Settings) -> None:
        origins = settings.cors_origin_list()
        self.any = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}

    def allows(self, origin: str | None, environ: dict[str, Any]) -> bool:
        if origin is None:  # Engine.IO asks for its CORS headers even without one: none needed
            return False
        if self.any or origin.rstrip("/").lower() in self.origins:
            return True
        scheme, sep, netloc = origin.partition("://")
        host = environ.get("HTTP_HOST")
        if not sep or not netloc or not host:
            return False  # "null" (a sandboxed or file: page) included
        # The scheme is compared as the browser sees it: a TLS-terminating proxy without
        # X-Forwarded-Proto makes the request look like plain http here, so default ports follow Origin.
        return authority(scheme.lower(), netloc) == authority(scheme.lower(), host)


def _send(start_response: StartResponse, error: APIError) -> Iterable[bytes]:
    """The error envelope, straight from WSGI (no Flask request runs for these refusals)."""
    body = json.dumps(error.envelope()).encode()
    try:
        reason = HTTPStatus(error.status).phrase
    except ValueError:
        reason = "Error"
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"),
        *error.headers.items(),
    ]
    start_response(f"{error.status} {reason}", headers)
    return [body]


def presented(environ: dict[str, Any], query: dict[str, list[str]]) -> str | None:
    """The key a handshake presents: ``Authorization: Bearer``, ``x-api-key``, or ``?api_key=``."""
    header = key_in_headers(environ.get("HTTP_AUTHORIZATION", ""), environ.get("HTTP_X_API_KEY", ""))
    if header:
        return header
    given = query.get(KEY_QUERY, [""])[0].strip()
    return given or None


class Guard:
    """The WSGI middleware (see the module's doc)."""

    def __init__(self, app: Flask, wsgi_app: Callable[..., Iterable[bytes]], settings: Settings, engineio: Any) -> None:
        self.app, self.wsgi_app, self.engineio = app, wsgi_app, engineio
        self.hosts = HostAllowList(settings)
        self.origins = OriginPolicy(settings)
        self.thread_cap = max(1, settings.threads // 2)
        self.session_cap = settings.max_socket_sessions
        self._lock = threading.Lock()
        self.held = 0  # Socket.IO requests running now (each holds a Gunicorn thread)
        self.polling: set[str] = set()  # sessions with a long-poll GET running

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if host is not None and not self.hosts.allows(host):
            return _send(
                start_response,
                APIError(
                    421,
                    f"This server does not answer for the host '{host_name(host)[:100]}'. Use its address, or "
                    "list the name in IMPETUS_ALLOWED_HOSTS.",
                    code="host_not_allowed",
                ),
            )
        if not environ.get("PATH_INFO", "").startswith(SOCKETIO_PREFIX):
            return self.wsgi_app(environ, start_response)
        return self.socketio(environ, start_response)

    def socketio(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and not self.origins.allows(origin, environ):
            return _send(
                start_response,
                APIError(
                    403,
                    "Socket.IO refused this page's origin: it takes connections from this server's own pages "
                    "and from the origins in IMPETUS_CORS_ORIGINS.",
                    code="origin_not_allowed",
                ),
            )
        if environ.get("REQUEST_METHOD") == "OPTIONS":
            return self.wsgi_app(environ, start_response)  # a CORS preflight: no credentials by design
        query = parse_qs(environ.get("QUERY_STRING", ""))
        sid = query.get("sid", [None])[0]
        if sid is None or sid not in self.engineio.sockets:
            refusal = self.admit(environ, query, handshake=sid is None)
            if refusal is not None:
                return _send(start_response, refusal)
        upgrade = environ.get("HTTP_UPGRADE", "").lower() == "websocket"
        poll = environ.get("REQUEST_METHOD") == "GET" and sid is not None and not upgrade
        if not (upgrade or poll):
            # A handshake or a POST is answered at once (a body's reads are bounded by
            # IMPETUS_READ_TIMEOUT): not capped, so a session can always send, even when long-polls
            # fill the cap.
            return self.wsgi_app(environ, start_response)
        with self._lock:
            if self.held >= self.thread_cap:
                refusal = APIError(
                    503,
                    f"This server has {self.thread_cap} Socket.IO connections running, its most; "
                    "retry later or on another replica.",
                    code="too_many_connections",
                    headers={"Retry-After": "5"},
                )
            elif poll and sid in self.polling:
                refusal = APIError(
                    400,
                    "This Socket.IO session already has a long-poll running; one at a time.",
                    code="overlapping_poll",
                )
            else:
                refusal = None
                self.held += 1
                if poll:
                    self.polling.add(sid)
        if refusal is not None:
            return _send(start_response, refusal)
        try:  # Engine.IO answers within this call (a WebSocket is served whole inside it)
            return self.wsgi_app(environ, start_response)
        finally:
            with self._lock:
                self.held -= 1
                if poll:
                    self.polling.discard(sid)

    def admit(self, environ: dict[str, Any], query: dict[str, list[str]], *, handshake: bool) -> APIError | None:
        """A request that would open a session (or names none that exists): the failed-login lockout,
        the rate limit, the key, the session cap, in the order the HTTP hooks take them."""
        remote = environ.get("REMOTE_ADDR")
        with self.app.app_context():
            found = services(self.app)
            checker, logins = found.keys, found.failed_logins
            key = presented(environ, query) if checker else None
            ident = scope = None
            if key is not None and checker:
                scope = checker.scope(key)
                ident = key_id(key) if scope is not None else None
            try:
                if checker and handshake and logins is not None:
                    logins.refuse_if_locked_out(remote)
                spend_budget(ident, remote)
            except APIError as exc:
                return exc
            if not handshake:
                return None  # Engine.IO answers 400: no such session
            if checker and ident is None:
                if logins is not None:
                    logins.fail(remote)
                message = (
                    "This server needs an API key to open a Socket.IO session: send 'Authorization: Bearer KEY' "
                    f"or, from a browser, the query parameter {KEY_QUERY}=KEY."
                    if key is None
                    else "Incorrect API key provided."
                )
                return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        # (a closed session stays in Engine.IO's table until its sweep, up to ping_timeout later)
        if sum(not session.closed for session in list(self.engineio.sockets.values())) >= self.session_cap:
            return APIError(
                503,
                f"This server has {self.session_cap} Socket.IO sessions open, its most; retry later "
                "or on another replica.",
                code="too_many_connections",
                headers={"Retry-After": "5"},
            )
        if ident is not None:
            environ[KEY_ID], environ[KEY_SCOPE] = ident, scope
        return None


def _timed_out(_exc: Exception) -> Response:
    response = error_response(
        APIError(408, "The request body did not arrive in time (IMPETUS_READ_TIMEOUT).", code="request_timeout")
    )
    response.headers["Connection"] = "close"
    return response


def _body_cut(exc: ClientDisconnected) -> Response:
    """Werkzeug reports any failed body read as ClientDisconnected (400); one that timed out is 408."""
    if isinstance(exc.__context__, TimeoutError):
        return _timed_out(exc)
    return error_response(APIError(400, exc.description or "The request body was cut short."))


def init_guard(app: Flask, settings: Settings, engineio: Any) -> Guard:
    """Wrap the app (after Socket.IO's middleware, before ProxyFix); answer body timeouts 408."""
    app.register_error_handler(TimeoutError, _timed_out)
    app.register_error_handler(ClientDisconnected, _body_cut)
    guard = Guard(app, app.wsgi_app, settings, engineio)
    app.wsgi_app = guard  # type: ignore[method-assign]
    return guard
