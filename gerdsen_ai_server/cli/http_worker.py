"""Impetus's Gunicorn worker: gthread, with no thread spent waiting on a client that has not sent
its request yet, and every later wait on a client bounded.

Why not plain ``gthread`` (Gunicorn 27.0.1, read in ``gunicorn/workers/gthread.py``):

* A new connection is handed to a pool thread at once; the thread waits up to 5 s for a first
  byte, and once one arrives it reads the rest of the head with *no* timeout. So a client sending a
  header line every few seconds holds a thread for as long as it likes (slowloris): ~70 such sockets
  took all 64 threads, probes included. Kept-alive connections go back to a thread on their first
  byte too.
* A connection that ends with ``Connection: close`` is closed gracefully (half-close, then up to
  2 s waiting for the client's FIN) on the worker's *main loop*: a client that never closes stalls
  accepting and dispatching for everyone, 2 s per connection.

What this worker does instead, as event-driven servers (nginx) do:

* The main loop reads every request head itself, non-blocking, from the selector it already runs;
  a connection gets a thread only once its head (up to the blank line) is in. A head must arrive
  whole within ``IMPETUS_HEADER_TIMEOUT`` seconds of the connection (or, kept alive, of its first
  byte), like nginx's ``client_header_timeout``; a head over 64 KiB is answered 431 (nginx allows
  32 KiB by default). Neither ever holds a thread.
* In the thread, every read of the body and every write of the response waits at most
  ``IMPETUS_READ_TIMEOUT`` seconds for the client (nginx's ``client_body_timeout`` /
  ``send_timeout``), and the body as a whole must keep up at least 500 bytes/s after those first
  seconds (Apache mod_reqtimeout's ``body=…,MinRate=500``): a body dripped a byte at a time does not
  hold a thread for hours. Flask sees a body read that timed out as ``TimeoutError``, which the
  app answers 408 (``guard.py``).
* WebSocket upgrades keep no timeout: simple-websocket reads the socket for the connection's whole
  life, and Engine.IO's pings keep it alive. Long-poll GETs and SSE streams write only when they have
  something to send; their waits are in the app, not on the socket.
* The graceful close lingers on the selector, not on the main loop.

TLS in Gunicorn itself (``certfile``) or cleartext HTTP/2 with prior knowledge need the socket
before any bytes are read: with either, heads are read in the thread as before, but still within
the head deadline. Terminate TLS at a proxy (docs/deployment.md).
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from gerdsen_ai_server.config import Settings

HEAD_LIMIT = 64 * 1024  # bytes of request line and headers; more is answered 431
MIN_BODY_RATE = 500  # bytes/s a body must average once its first IMPETUS_READ_TIMEOUT seconds are spent
LINGER_S = 2.0  # a graceful close waits this long for the client's FIN (Gunicorn's own figure)
LINGER_BYTES = 64 * 1024
RECV_SIZE = 65536


def _refusal(status: str, message: str, code: str) -> bytes:
    """A complete HTTP response in the API's error envelope, for refusals made before any app runs."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


HEAD_TOO_LARGE = _refusal(
    "431 Request Header Fields Too Large",
    f"The request's line and headers are larger than {HEAD_LIMIT // 1024} KiB.",
    "request_header_too_large",
)


def recv_nowait(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket holds now: None when nothing has arrived yet, b"" when the client
    closed or reset the connection."""
    try:
        return sock.recv(RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class TimedUnreader(SocketUnreader):
    """Gunicorn's socket reader, with each ``recv`` bounded by the phase the request is in:

    * head: everything up to the blank line before ``deadline`` (an absolute monotonic time);
    * body: each read within ``idle`` seconds, and all of it before ``deadline``, which each byte
      received pushes ``1 / rate`` seconds further;
    * neither (a WebSocket, or Gunicorn draining a body under its own deadline): the socket as is.
    """

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        super().__init__(sock)
        if buffered:
            self.buf.write(buffered)
        self.deadline: float | None = None
        self.idle: float | None = None
        self.rate = 0.0

    def head(self, deadline: float) -> None:
        self.deadline, self.idle, self.rate = deadline, None, 0.0

    def body(self, timeout: float | None) -> None:
        if timeout is None:
            self.deadline, self.idle, self.rate = None, None, 0.0
        else:
            self.deadline, self.idle, self.rate = time.monotonic() + timeout, timeout, MIN_BODY_RATE

    def unbounded(self) -> None:
        self.deadline, self.idle, self.rate = None, None, 0.0

    def chunk(self, size_hint: int | None = None) -> bytes:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client was too slow sending its request")
            self.sock.settimeout(left if self.idle is None else min(left, self.idle))
        elif self.idle is not None:
            self.sock.settimeout(self.idle)
        data: bytes = super().chunk(size_hint)
        if self.rate and self.deadline is not None:
            self.deadline += len(data) / self.rate
        return data


class TimedConn(TConn):
    """A connection that may arrive with its head already read by the main loop (``received``)."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any, worker: ImpetusWorker) -> None:
        super().__init__(cfg, sock, client, server)
        self.worker = worker
        self.head: bytearray | None = None  # bytes read so far by the main loop, while it reads the head
        self.received = b""  # the head the main loop read, for the parser
        self.head_deadline: float | None = None
        self.drained = 0  # bytes read while lingering
        self.gone = False  # closed by the main loop: a selector event still queued for it is ignored
        # Upgraded to a WebSocket: simple-websocket's reader thread owns the socket from then on and
        # closes it when the connection ends, at a moment of its own choosing.
        self.upgraded = False

    def init(self) -> None:
        if self.initialized:
            return
        super().init()
        if isinstance(self.parser, RequestParser) and not isinstance(self.parser.unreader, TimedUnreader):
            self.parser.unreader = TimedUnreader(self.sock, self.parser.unreader.take_buffered())
        self.start_head()

    def start_head(self) -> None:
        """Before a request is parsed: hand the parser what the main loop read, bound the rest."""
        unreader = getattr(self.parser, "unreader", None)
        if not isinstance(unreader, TimedUnreader):
            return
        if self.received:
            unreader.unread(self.received)
            self.received = b""
        unreader.head(
            self.head_deadline if self.head_deadline is not None else time.monotonic() + self.worker.header_timeout
        )

    def close(self, graceful: bool = False) -> None:
        if self.upgraded:
            # Never on the selector: the WebSocket's reader thread may close this socket after we
            # registered it, and the next accepted connection, given the same descriptor, then
            # found it "already registered" (a KeyError that killed the worker: 20 restarts in 40 s
            # of WebSocket connects and disconnects). A WebSocket has ended with its own closing
            # handshake: no linger is owed.
            util.close(self.sock)
        elif graceful and self.worker.head_first:
            self.worker.linger(self)
        else:
            super().close(graceful)


def _is_upgrade(req: Any) -> bool:
    return any(name.upper() == "UPGRADE" for name, _ in req.headers)


class ImpetusWorker(ThreadWorker):
    """``gthread`` with heads read on the main loop and client waits bounded (see the module's doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings()
        self.header_timeout = settings.header_timeout
        self.read_timeout = settings.read_timeout or None
        # Reading heads on the main loop needs the raw bytes: not with Gunicorn's own TLS, or with
        # h2c prior knowledge (which sniffs the socket for HTTP/2's preface itself).
        self.head_first = (
            not self.cfg.is_ssl
            and self.cfg.protocol == "http"
            and self.cfg.http2_cleartext not in ("prior-knowledge", "both")
        )
        self.heads: deque[TimedConn] = deque()  # reading their head, oldest deadline first
        self.lingering: deque[TimedConn] = deque()  # closing: waiting for the client's FIN

    # ---- the main loop: accept, read heads, linger ----------------------------------------------
    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TimedConn(self.cfg, client_sock, client_addr, listener.getsockname(), self)
        if self.head_first:
            self.read_head(conn)
            if self.nr_conns >= self.worker_connections:
                self.shed()
        else:
            client_sock.setblocking(True)
            self.enqueue_req(conn)

    def shed(self) -> None:
        """At ``worker_connections``, Gunicorn stops accepting until a connection closes, so idle
        or slow ones would keep new clients (probes too) out. Close the oldest connection that is
        doing nothing instead, as nginx reuses idle connections when it runs out: a kept-alive one,
        else the one that has been sending its head the longest."""
        if self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self._close(conn)
        elif len(self.heads) > 1:
            conn = self.heads[0]
            self._end_head(conn)
            self._close(conn)

    def on_client_socket_readable(self, conn: TimedConn, client: Any) -> None:
        """A kept-alive connection sent something: read its next head here too, not in a thread."""
        if not self.head_first:
            super().on_client_socket_readable(conn, client)
            return
        if conn.gone:  # shed by an accept earlier in this same batch of selector events
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.read_head(conn)

    def read_head(self, conn: TimedConn) -> None:
        conn.head = bytearray()
        conn.head_deadline = conn.timeout = time.monotonic() + self.header_timeout
        conn.sock.setblocking(False)
        self.heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_head_readable, conn))

    def on_head_readable(self, conn: TimedConn, _client: Any) -> None:
        if conn.head is None or conn.gone:  # handled earlier in this batch of selector events
            return
        data = recv_nowait(conn.sock)
        if data is None:
            return
        if not data:  # the client left (or reset) before sending a whole head
            self._end_head(conn)
            self._close(conn)
            return
        start = max(0, len(conn.head) - 3)
        conn.head += data
        if conn.head.find(b"\n\r\n", start) >= 0 or conn.head.find(b"\n\n", start) >= 0:
            conn.received = bytes(conn.head)
            self._end_head(conn)
            conn.data_ready = True  # no 5 s wait for a first byte in the thread: the head is here
            conn.sock.setblocking(True)
            self.enqueue_req(conn)
        elif len(conn.head) > HEAD_LIMIT:
            self._end_head(conn)
            try:
                conn.sock.send(HEAD_TOO_LARGE)  # best effort, non-blocking: it fits a socket buffer
            except OSError:
                pass
            self._close(conn)

    def _end_head(self, conn: TimedConn) -> None:
        self.poller.unregister(conn.sock)
        self.heads.remove(conn)
        conn.head = None

    def _close(self, conn: TimedConn) -> None:
        conn.gone = True
        self.nr_conns -= 1
        util.close(conn.sock)

    def linger(self, conn: TimedConn) -> None:
        """RFC 9112 section 9.6's graceful close, on the selector: half-close, then read and drop what
        the client still sends until it closes, 64 KiB or 2 s, whichever comes first."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_linger_readable, conn))
        except (OSError, ValueError, KeyError):
            util.close(conn.sock)
            return
        conn.timeout = time.monotonic() + LINGER_S
        conn.drained = 0
        conn.gone = False
        self.lingering.append(conn)

    def on_linger_readable(self, conn: TimedConn, _client: Any) -> None:
        if conn.gone:
            return
        data = recv_nowait(conn.sock)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn: TimedConn) -> None:
        conn.gone = True
        self.lingering.remove(conn)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        util.close(conn.sock)

    def murder_pending(self) -> None:
        """Each loop: Gunicorn's expiries, then heads past their deadline and finished lingers."""
        super().murder_pending()
        now = time.monotonic()
        while self.heads and (self.heads[0].timeout <= now):
            conn = self.heads[0]
            self._end_head(conn)
            self._close(conn)
        if not self.alive:  # stopping: a connection that has sent nothing yet is not waited for
            for conn in [c for c in self.heads if not c.head]:
                self._end_head(conn)
                self._close(conn)
        while self.lingering and self.lingering[0].timeout <= now:
            self._end_linger(self.lingering[0])

    def run(self) -> None:
        try:
            super().run()
        finally:
            for conn in list(self.heads) + list(self.lingering):
                util.close(conn.sock)

    # ---- a pool thread: one request ------------------------------------------------------------
    def handle(self, conn: TimedConn) -> Any:
        if conn.head_deadline is None:  # a pipelined request, or heads read in the thread
            conn.head_deadline = time.monotonic() + self.header_timeout
        if conn.parser is not None:
            conn.start_head()
        # (a new connection's parser is made in conn.init(), which starts the head itself)
        return super().handle(conn)

    def handle_request(self, req: Any, conn: TimedConn) -> Any:
        """The head is in: from here the body and the response are bounded per read and write,
        except for an upgrade (a WebSocket lives on the socket for as long as it is open)."""
        conn.head_deadline = None  # the next request's head gets a deadline of its own
        conn.upgraded = _is_upgrade(req)
        timeout = None if conn.upgraded else self.read_timeout
        unreader = getattr(conn.parser, "unreader", None)
        if isinstance(unreader, TimedUnreader):
            unreader.body(timeout)
        conn.sock.settimeout(timeout)
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn: TimedConn, keepalive: Any) -> bool:
        unreader = getattr(conn.parser, "unreader", None)
        if isinstance(unreader, TimedUnreader):
            unreader.unbounded()  # Gunicorn's drain sets its own per-read timeouts
        return bool(super()._keepalive_after(conn, keepalive))
