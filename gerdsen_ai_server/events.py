"""The in-process event bus: the engine and registry publish, Socket.IO (and tests) subscribe.

A leaf module with no Flask and no MLX. Subscribers run on the publisher's thread (often the
engine thread), so they must be quick and must not call MLX: Socket.IO's emit is fine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Subscriber = Callable[[str, dict[str, Any]], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Registers ``callback(kind, payload)``; returns a function that unsubscribes it."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, kind: str, **payload: Any) -> None:
        payload.setdefault("timestamp", time.time())
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(kind, payload)
            except Exception:  # one bad subscriber must not break the publisher (the engine)
                log.exception("event subscriber failed on %s", kind)
