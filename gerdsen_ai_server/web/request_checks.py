"""Request checks before any view: JSON bodies only, no cross-origin writes, browser security headers, CORS.

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
* Size: Flask's ``MAX_CONTENT_LENGTH`` (security.py sets it); Werkzeug refuses a larger body
  (declared or streamed) with 413, which ``web/errors.py`` turns into the error envelope.
* Browsers: security headers on every response (no sniffing, no framing, no referrer, a CSP that
  allows only same-origin scripts, styles, images and connections: a JSON API plus the docs page
  and a future same-origin dashboard); CORS (flask-cors) only for ``IMPETUS_CORS_ORIGINS``.
"""

from __future__ import annotations

from flask import Flask, Response, request
from flask_cors import CORS

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.web.errors import APIError
from gerdsen_ai_server.web.keys import SAFE_METHODS

# /rerank: Cohere's and vLLM's root alias of /v1/rerank; /tokenize, /detokenize, /apply-template: vLLM's and
# llama-server's root paths
API_PREFIXES = ("/v1/", "/api/", "/rerank", "/tokenize", "/detokenize", "/apply-template")


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
    raise APIError(
        403,
        "Cross-origin request refused: this server takes state-changing requests from its own "
        "pages, and from the origins in IMPETUS_CORS_ORIGINS.",
        code="cross_origin_request",
    )


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
    raise APIError(
        415,
        f"Unsupported Content-Type '{given}': send the body as JSON with 'Content-Type: application/json'.",
        code="unsupported_media_type",
    )


# ---- browsers ----------------------------------------------------------------------------------

CONTENT_SECURITY_POLICY = "; ".join(
    [
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
    ]
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cross-Origin-Opener-Policy": "same-origin",
}
# What a browser client may send and read across origins (OpenAI's and Anthropic's SDKs included).
CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "X-Request-ID",
    "x-api-key",
    "anthropic-version",
    "OpenAI-Organization",
    "OpenAI-Project",
    "X-Stainless-.*",
]
CORS_EXPOSE_HEADERS = [
    "X-Request-ID",
    "Retry-After",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
]


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def init_browser_policy(app: Flask, settings: Settings) -> None:
    app.after_request(add_security_headers)
    origins = settings.cors_origin_list()
    if origins:
        CORS(
            app,
            origins="*" if "*" in origins else origins,
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            supports_credentials=False,
            max_age=600,
        )
