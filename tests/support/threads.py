"""``at_once``: run ``work(i)`` for i in range(n) on n threads started together, and return the answers in order."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def at_once(work: Callable[[int], T], n: int, timeout: float) -> list[T]:
    """Each ``work(i)`` on its own thread, all started before any is joined (so the engine sees them as
    one batch); fails when one has not finished within ``timeout`` seconds of its join."""
    results: list[T | None] = [None] * n
    done = [False] * n

    def one(i: int) -> None:
        results[i] = work(i)
        done[i] = True

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert all(done), "a request did not finish"
    return results  # type: ignore[return-value]
