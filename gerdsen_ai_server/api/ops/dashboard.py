"""The dashboard: impetus-dashboard's build (``pnpm build`` -> ``dist/``) served at ``/``.

A ``before_request`` hook, not a catch-all route: a ``/<path:...>`` route would also match a GET to
a POST-only API route and turn its 405 into the dashboard. The hook answers only GET/HEAD requests
that matched no route and lie outside the API's prefixes, so the API keeps every path it has, and
its unknown paths keep their JSON 404.

* A file of the build (``/assets/index-<hash>.js``, ``/favicon.svg``): sent as is; hashed assets are
  cached for a year.
* Any other path (``/``, ``/models``, ``/playground``, ...): ``index.html``, the single-page app's
  fallback, so a reload or a shared link opens that page. A missing file with an extension stays a
  404: a browser asking for a script must not get HTML.
* No build: a JSON 404 saying how to build it.

The files hold no secret, so ``init_dashboard`` runs before ``init_security``: the page must load
without a key to ask for one; everything it then fetches goes through the key check.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from flask import Flask, Response, request, send_from_directory
from werkzeug.security import safe_join

from gerdsen_ai_server.services import require, services
from gerdsen_ai_server.web.errors import APIError

# Paths the API owns (first segment): never the dashboard's, even when nothing there matches.
API_PREFIXES = frozenset(
    {"v1", "api", "health", "metrics", "openapi.json", "docs", "socket.io", "static"}
    | {"tokenize", "detokenize", "apply-template"}  # vLLM's and llama-server's, at the root
)
YEAR = 365 * 24 * 3600


def is_api_path(path: str) -> bool:
    return path.lstrip("/").split("/", 1)[0] in API_PREFIXES


def init_dashboard(app: Flask, dist: Path) -> None:
    """The build's folder goes into ``services().dashboard_dir``; the hook answers from it."""
    services(app).dashboard_dir = dist
    app.before_request(serve_dashboard)


def serve_dashboard() -> Response | None:
    if request.method not in ("GET", "HEAD") or request.url_rule is not None or is_api_path(request.path):
        return None  # a route answers (or 404s / 405s) as usual
    dist = require(services().dashboard_dir, "dashboard_dir")
    if not (dist / "index.html").is_file():
        raise APIError(
            404,
            f"The dashboard is not built ({dist / 'index.html'} is missing): run `make dashboard`, "
            "or set IMPETUS_DASHBOARD_DIR to a built dashboard. The API is at /v1.",
            code="dashboard_not_built",
        )
    relative = request.path.lstrip("/")
    if relative:
        file = safe_join(str(dist), relative)
        if file is not None and Path(file).is_file():
            immutable = relative.startswith("assets/")
            return send_from_directory(dist, relative, max_age=YEAR if immutable else 0)
        if PurePosixPath(relative).suffix:
            raise APIError(404, f"The requested URL /{relative} was not found on the server.", code="not_found")
    response = send_from_directory(dist, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
