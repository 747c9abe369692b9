"""The failed-login lockout: failed authentications per client address, in a moving window.

Every failed authentication (a wrong key where one is needed, over HTTP or a Socket.IO handshake)
spends the client address's budget (``IMPETUS_AUTH_FAIL_LIMIT``, 20 a minute by default). Once it is
spent, every request from that address that needs a key gets 429, right keys included, until the
window lets it go (fail2ban's ban, not a per-key limit: otherwise 429 for a wrong key and 200 for a
right one would still answer every guess).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from operator import methodcaller
from typing import TYPE_CHECKING, Any

from gerdsen_ai_server.errors import APIError

if TYPE_CHECKING:
    from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

FAILED_LOGINS = "impetus_failed_logins"  # the counters' name in their storage (memory or Redis)


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
        self._shared = (
            MovingWindowRateLimiter(storage_from_string(redis_url, socket_timeout=1, socket_connect_timeout=1))
            if redis_url
            else self._memory
        )

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
            self._run(methodcaller("hit", item, FAILED_LOGINS, remote or "unknown"))

    def wait(self, remote: str | None) -> int:
        """Seconds until ``remote`` may try again: 0 while its budget lasts."""
        ids = (FAILED_LOGINS, remote or "unknown")
        for item in self.items:
            if not self._run(methodcaller("test", item, *ids)):
                stats = self._run(methodcaller("get_window_stats", item, *ids))
                return max(1, math.ceil(stats.reset_time - time.time()))
        return 0

    def refuse_if_locked_out(self, remote: str | None) -> None:
        """429 for an address whose failed-login budget is spent (a Socket.IO handshake asks too)."""
        wait = self.wait(remote)
        if wait:
            raise APIError(
                429,
                "Too many failed authentications from this client address "
                f"(IMPETUS_AUTH_FAIL_LIMIT). Please try again in {wait}s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
