"""The requests running now: the table the operator lists and cancels from (``GET /api/requests``,
``DELETE /api/requests/<id>``, api/admin/requests.py), and the watch that ends work nobody waits
for any more.

Every generation (``submit_all``) and embedding registers here while it runs, and its streams carry
a watch (``TokenStream.watch``) that the reading thread runs every quarter second, busy or idle. It
ends the request, cancelling every sequence it has in the engine, when

* an operator cancelled it: 503 ``request_cancelled`` (an SSE stream gets that error event, then ends);
* its deadline passed (``IMPETUS_REQUEST_TIMEOUT``, queue time included): 504 ``request_timeout``;
* its client closed the connection: nginx's 499 "client closed request", which nobody receives.

Both errors carry ``x-should-retry: false``, which the OpenAI and Anthropic SDKs obey: retrying
would only resubmit what the operator or the deadline just stopped.

Why poll the socket: under Gunicorn's gthread worker a non-streaming request's thread waits in
``collect()`` until the last token and writes nothing meanwhile, so a client that had left was
noticed only when the answer was written (an abandoned ``n=40, max_tokens=2000`` request kept 18
sequences decoding for over four minutes while others got 503). A peek at the client's socket
(``MSG_PEEK | MSG_DONTWAIT``: nothing is consumed, nothing blocks) reads end-of-file once the
client has closed, as vLLM learns it from Starlette's ``is_disconnected()``. A client that
half-closes its side after sending (``shutdown(SHUT_WR)``) looks gone too; HTTP clients do not.

Registering reads the current request (Flask's ``request`` and ``g``: its path, client, key id
and socket), so ``watch_streams`` and ``watch_embedding`` run in a request context (HTTP, or a
Socket.IO event's).
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import g, request

from gerdsen_ai_server.engine.embeddings import EmbeddingJob
from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.requests import RunningRequest
from gerdsen_ai_server.services import require, services
from gerdsen_ai_server.serving.tracking import route

NO_RETRY = {"x-should-retry": "false"}
KINDS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
    **dict.fromkeys(("/v1/rerank", "/rerank", "/v1/reranking"), "rerank"),
}


class ClientGone(APIError):
    """The client closed its connection: the request's work is cancelled and nothing is answered."""

    def __init__(self) -> None:
        super().__init__(
            499, "The client closed the connection; its request was cancelled.", code="client_closed_request"
        )


def peer_closed(sock: Any) -> bool:
    """Whether the client at the other end of ``sock`` has closed (end-of-file, a reset, a hang-up).

    Works on the descriptor, not on the server's socket object: that one may carry a timeout (Python
    then waits up to it inside ``recv`` and raises TimeoutError, which read as "closed" here before)
    or be a TLS socket, which refuses ``recv`` flags. Nothing is consumed and nothing blocks.
    """
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return True
    if fd < 0:
        return True  # closed on our side already
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return True
    elif not select.select([fd], [], [], 0)[0]:
        return False
    raw = socket.socket(fileno=fd)  # a second view of the same descriptor, without timeout or TLS
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""  # data: still there (pipelining)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset
    finally:
        raw.detach()  # the descriptor stays the server's


@dataclass(eq=False)
class Running:
    """One request in flight: what the operator sees, and the check its reader runs."""

    id: str
    kind: str
    route: str
    model: str
    client: str | None
    key_id: str | None
    request_id: str | None
    timeout: float  # seconds; 0: none
    streams: list[TokenStream] = field(default_factory=list)
    job: EmbeddingJob | None = None
    sock: Any = None  # the client's socket, when the server exposes it (Gunicorn, Werkzeug)
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def check(self) -> None:
        """Raise if this request should end now; run by the thread that waits for its results."""
        if self.cancelled:
            raise APIError(
                503, "This request was cancelled by the server's operator.", code="request_cancelled", headers=NO_RETRY
            )
        if self.timeout and time.monotonic() - self.started > self.timeout:
            raise APIError(
                504,
                f"The request ran longer than this server allows ({self.timeout:g} s, "
                "IMPETUS_REQUEST_TIMEOUT) and was cancelled; ask for fewer tokens (max_tokens, n) or "
                "fewer inputs.",
                code="request_timeout",
                headers=NO_RETRY,
            )
        if self.sock is not None and peer_closed(self.sock):
            raise ClientGone()

    def cancel(self) -> None:
        """Free its engine places now; its reader raises at its next check."""
        self.cancelled = True
        for stream in self.streams:
            stream.cancel()
        if self.job is not None:
            self.job.cancel()

    @property
    def ended(self) -> bool:
        if self.job is not None:
            return self.job.future.done() or self.job.cancelled
        return all(s.cancelled or s.finished_at is not None for s in self.streams)

    def describe(self) -> RunningRequest:
        age = time.monotonic() - self.started
        return RunningRequest(
            id=self.id,
            kind=self.kind,
            route=self.route,
            model=self.model,
            sequences=len(self.streams),
            prompt_tokens=(
                sum(len(s.request.prompt_tokens) for s in self.streams) if self.job is None else self.job.tokens_total
            ),
            completion_tokens=sum(s.completion_tokens for s in self.streams),
            embedded_tokens=self.job.tokens_done if self.job is not None else 0,
            age_s=round(age, 3),
            deadline_in_s=round(max(self.timeout - age, 0.0), 3) if self.timeout else None,
            client=self.client,
            key_id=self.key_id,
            request_id=self.request_id,
            cancelled=self.cancelled,
        )


class RequestTable:
    """The requests in flight, by id. An entry leaves once all its work has ended in the engine
    (finished, failed or cancelled): pruned whenever the table is written or read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Running] = {}

    def add(self, entry: Running) -> None:
        with self._lock:
            self._prune()
            self._running[entry.id] = entry

    def running(self) -> list[Running]:
        with self._lock:
            self._prune()
            return sorted(self._running.values(), key=lambda e: e.started)

    def get(self, request_id: str) -> Running | None:
        with self._lock:
            self._prune()
            return self._running.get(request_id)

    def _prune(self) -> None:
        for key in [key for key, entry in self._running.items() if entry.ended]:
            del self._running[key]


def table() -> RequestTable:
    """This app's running requests (``Services.running``, one table per app)."""
    return require(services().running, "running")


def _register(model: str, *, streams: list[TokenStream] | None = None, job: EmbeddingJob | None = None) -> Running:
    """An entry for the current request (HTTP, or a Socket.IO event's context), added to the table."""
    path = route()
    # A Socket.IO event's environ is its connection's (a polling request long answered, or the
    # WebSocket's): its socket says nothing about this generation. realtime.py cancels on disconnect.
    sock = (
        None
        if request.path.startswith("/socket.io")
        else (request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket"))
    )
    entry = Running(
        id=streams[0].request.request_id if streams else uuid.uuid4().hex,
        kind=KINDS.get(path, "generate" if request.path.startswith("/socket.io") else path),
        route=path,
        model=model,
        client=request.remote_addr,
        key_id=g.get("api_key_id"),
        request_id=g.get("request_id"),
        timeout=services().settings.request_timeout,
        streams=streams or [],
        job=job,
        sock=sock,
    )
    table().add(entry)
    return entry


def watch_streams(streams: list[TokenStream]) -> Running:
    """Register a generation; its streams' readers then run the entry's check as they wait."""
    entry = _register(streams[0].request.model, streams=streams)
    for stream in streams:
        stream.watch = entry.check
    return entry


def watch_embedding(job: EmbeddingJob) -> Running:
    return _register(job.model_id, job=job)
