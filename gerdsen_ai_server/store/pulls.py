"""Pulls in background threads for the server: their state, cancellation and ``pull_progress`` events.

Threads, not the engine thread: a pull is plain I/O with no MLX. Bounded twice: at most
``max_pulls`` pulls are queued or downloading at once (more are refused with PullQueueFull, which
the API answers 429), and only ``max_parallel`` threads ever run them: a queued pull is a record in
a queue, not a thread waiting for a slot (150 pulls made 150 threads before). Events are throttled
(at most ``events_per_second`` per pull, plus every change of status) because subscribers run on
the publishing thread and Socket.IO forwards them to browsers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.store.download import parse_ref, pull
from gerdsen_ai_server.store.hub import PullCancelled, PullError, check_repo_id

log = logging.getLogger(__name__)

ACTIVE = ("queued", "downloading")


class PullQueueFull(PullError):
    """As many pulls as allowed are queued or downloading; the caller may retry once one ends."""


@dataclass
class Pull:
    id: str
    repo: str
    revision: str
    gguf: str | None
    status: str = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    path: str | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    last_event: float = field(default=0.0, repr=False)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.repo,
            "revision": self.revision,
            "status": self.status,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "path": self.path,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


class PullManager:
    """Pulls run by at most ``max_parallel`` threads, at most ``max_pulls`` queued or running."""

    def __init__(
        self,
        models_dir: Path,
        events: EventBus | None = None,
        *,
        max_parallel: int = 2,
        max_pulls: int = 16,
        events_per_second: float = 4.0,
        keep_finished: int = 100,
        endpoint: str | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.events = events or EventBus()
        self.endpoint = endpoint
        self.max_pulls = max_pulls
        self._max_parallel = max_parallel
        self._interval = 1.0 / events_per_second
        self._keep_finished = keep_finished
        self._pulls: dict[str, Pull] = {}
        self._queue: deque[Pull] = deque()
        self._workers = 0
        self._lock = threading.Lock()

    def start(self, repo_id: str, *, revision: str = "main", gguf: str | None = None) -> dict[str, Any]:
        """Queue (or join: the same repo already being pulled) a pull; returns its state.

        Raises PullQueueFull when ``max_pulls`` pulls are already queued or downloading. ``repo_id``
        may carry a GGUF tag (``org/name:Q4_K_M``, download.parse_ref) instead of ``gguf``.
        """
        repo_id, gguf = parse_ref(repo_id, gguf)
        check_repo_id(repo_id)
        with self._lock:
            active = 0
            for existing in self._pulls.values():
                if existing.status in ACTIVE:
                    if existing.repo == repo_id:
                        return existing.snapshot()
                    active += 1
            if active >= self.max_pulls:
                raise PullQueueFull(
                    f"{active} pulls are already queued or downloading (IMPETUS_MAX_PULLS="
                    f"{self.max_pulls}); retry when one has finished, or cancel one"
                )
            pull_ = Pull(id=f"pull-{uuid.uuid4().hex[:12]}", repo=repo_id, revision=revision, gguf=gguf)
            self._pulls[pull_.id] = pull_  # counts against max_pulls from here on
            self._forget_old()
        self._publish(pull_, force=True)  # "queued" goes out before a worker can say "downloading"
        with self._lock:
            self._queue.append(pull_)
            spawn = self._workers < self._max_parallel
            if spawn:
                self._workers += 1
        if spawn:
            threading.Thread(target=self._work, name=f"pull-worker-{uuid.uuid4().hex[:6]}", daemon=True).start()
        return pull_.snapshot()

    def get(self, pull_id: str) -> dict[str, Any] | None:
        with self._lock:
            pull_ = self._pulls.get(pull_id)
            return pull_.snapshot() if pull_ else None

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [p.snapshot() for p in self._pulls.values()]

    def active_repos(self) -> set[str]:
        with self._lock:
            return {p.repo for p in self._pulls.values() if p.status in ACTIVE}

    def cancel(self, pull_id: str, wait: float = 5.0) -> dict[str, Any] | None:
        """Ask the pull to stop and wait (briefly) until it has; partial files stay for a later pull."""
        with self._lock:
            pull_ = self._pulls.get(pull_id)
            if pull_ is None:
                return None
            pull_.cancel.set()
            queued = pull_ in self._queue
            if queued:  # never started: nothing to wait for
                self._queue.remove(pull_)
        if queued:
            self._finish(pull_, "cancelled")
        self.join(pull_id, wait)
        return pull_.snapshot()

    def join(self, pull_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        with self._lock:
            pull_ = self._pulls.get(pull_id)
        if pull_ is None:
            return None
        pull_.done.wait(timeout)
        return pull_.snapshot()

    def _work(self) -> None:
        """One of at most ``max_parallel`` threads: runs queued pulls until the queue is empty."""
        while True:
            with self._lock:
                if not self._queue:
                    self._workers -= 1
                    return
                pull_ = self._queue.popleft()
            self._run(pull_)

    def _run(self, pull_: Pull) -> None:
        if pull_.cancel.is_set():
            self._finish(pull_, "cancelled")
            return
        try:
            pull_.status = "downloading"
            self._publish(pull_, force=True)
            path = pull(
                pull_.repo,
                self.models_dir,
                revision=pull_.revision,
                gguf=pull_.gguf,
                endpoint=self.endpoint,
                cancel=pull_.cancel,
                on_progress=lambda done, total: self._progress(pull_, done, total),
            )
            pull_.path = str(path)
            self._finish(pull_, "done")
        except PullCancelled:
            self._finish(pull_, "cancelled")
        except PullError as exc:
            self._finish(pull_, "failed", str(exc))
        except Exception as exc:  # a bug or the disk: the pull fails, the server does not
            log.exception("pull of %s failed", pull_.repo)
            self._finish(pull_, "failed", f"{type(exc).__name__}: {exc}")

    def _progress(self, pull_: Pull, done: int, total: int) -> None:
        pull_.bytes_done, pull_.bytes_total = done, total
        self._publish(pull_)

    def _finish(self, pull_: Pull, status: str, error: str | None = None) -> None:
        pull_.status, pull_.error, pull_.finished_at = status, error, time.time()
        if error:
            log.warning("pull of %s failed: %s", pull_.repo, error)
        self._publish(pull_, force=True)
        pull_.done.set()

    def _publish(self, pull_: Pull, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - pull_.last_event < self._interval:
            return
        pull_.last_event = now
        self.events.publish("pull_progress", **pull_.snapshot())

    def _forget_old(self) -> None:
        finished = [p for p in self._pulls.values() if p.status not in ACTIVE]
        for old in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._pulls[old.id]
