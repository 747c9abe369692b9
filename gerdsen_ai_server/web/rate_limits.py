"""Rate limits (flask-limiter, ``IMPETUS_RATE_LIMIT``): one budget per API key, else per client address.

One budget per API key, or per client IP for requests without a valid key (so failed logins count
too), shared by every route but the probes, monitoring and docs; a Socket.IO ``generate`` (and every
other Socket.IO event, and each Engine.IO handshake) spends the same budget (``spend_budget``).
Counters live in memory, or in Redis (``IMPETUS_REDIS_URL``) so that replicas share them. Every
limited response carries OpenAI's ``x-ratelimit-*-requests`` headers; a 429 also ``Retry-After``. A
storage outage fails open to in-memory counters rather than refusing traffic.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, Response, g, request
from flask_limiter import Limiter, RateLimitExceeded

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.services import services
from gerdsen_ai_server.web.errors import APIError, error_response
from gerdsen_ai_server.web.keys import DOCS_PATHS, DOCS_PREFIX, MONITORING_PATHS, PROBE_PATHS

log = logging.getLogger(__name__)

LIMIT_PREFIX = "impetus"  # flask-limiter's key prefix: the counters' names in memory or Redis


def bucket(key: str | None, remote: str | None) -> str:
    return f"key:{key}" if key else f"ip:{remote or 'unknown'}"


def rate_key() -> str:
    return bucket(g.get("api_key_id"), request.remote_addr)


def spend_budget(key: str | None, remote: str | None) -> None:
    """Count one request against the rate limit for work that arrives outside an HTTP request (a
    Socket.IO ``generate``): the same bucket the HTTP API spends, per key or else per address.
    The counters are flask-limiter's own (its application limits are shared, scope "global")."""
    found = services()
    limiter = found.limiter
    if limiter is None:
        return
    from limits import parse_many

    args = [LIMIT_PREFIX, bucket(key, remote), "global"]
    try:
        for item in parse_many(found.settings.rate_limit):
            if not limiter.limiter.hit(item, *args):
                reset = limiter.limiter.get_window_stats(item, *args).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                who = "this API key" if key else "this client address"
                raise APIError(
                    429,
                    f"Rate limit reached for {who}: {item}. Please try again in {wait}s.",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(wait)},
                )
    except APIError:
        raise
    except Exception:  # storage unreachable: fail open, as the HTTP limiter does
        log.warning("rate-limit storage unreachable; not counting a Socket.IO request", exc_info=True)


def rate_exempt() -> bool:
    path = request.path
    return (
        request.method == "OPTIONS"
        or path in PROBE_PATHS
        or path in MONITORING_PATHS
        or path in DOCS_PATHS
        or path.startswith(DOCS_PREFIX)
    )


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
        return error_response(
            APIError(
                429,
                f"Rate limit reached for {who}: {exc.limit.limit}. Please try again in {wait}s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        )

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
