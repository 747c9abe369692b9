"""The Socket.IO channel (one namespace, ``/``): the dashboard's live feed and a streaming ``generate``.

Threading mode over simple-websocket: Gunicorn's gthread worker carries it (no eventlet: Gunicorn >=
26 has no eventlet worker). The parts: channel.py (the ``Namespace`` class, one method per event),
generate.py (``generate``), fanout.py (room events to every replica), transport.py (the server,
message size, idle sessions). ``init_realtime`` wires them to an app.

Server -> client events, each sent to its room:

    metrics        every IMPETUS_METRICS_INTERVAL s: engine counters, tok/s, memory, thermal state   room "metrics"
    hardware       the /api/hardware report: on connect, on request, when the thermal state changes   room "metrics"
    request_event  a generating request started / finished (TTFT, tokens, tok/s)                   room "requests"
    model_event    a model is loading, loaded, failed, unloaded, evicted, expired or deleted         room "models"
    pull_progress  a model pull's bytes and status                                                  room "models"

With API keys configured (IMPETUS_API_KEYS / IMPETUS_API_KEY_FILE) the Engine.IO handshake needs one
before any session exists (gerdsen_ai_server/web/guard.py): an ``Authorization: Bearer KEY`` header
(python-socketio: ``connect(url, headers=...)``) or, from a browser, which cannot set headers on a
WebSocket, the query parameter ``api_key=KEY`` (socket.io-client: ``io(url, {query: {api_key}})``);
without, 401 ``invalid_api_key``. A key in the connect ``auth`` (``{"api_key": KEY}``) must be right
too. The guard also checks the page's ``Origin`` (this server's own pages, or IMPETUS_CORS_ORIGINS),
counts each handshake against IMPETUS_RATE_LIMIT and caps sessions and the threads they hold.

Client -> server events (every payload validated by its pydantic model in schemas/realtime.py; a bad
one is answered with OpenAI's error envelope). Each event, unknown ones included, spends the caller's
IMPETUS_RATE_LIMIT budget as an HTTP request does (per key, else per address); past it the ack is
the 429 envelope (``rate_limit_exceeded``) and the event does nothing:

    subscribe / unsubscribe   rooms (``"metrics"``, ``["metrics", ...]`` or ``{"rooms": [...]}``);
                              ack ``{"rooms": [...joined]}`` or ``{"error": {...}, "rooms": [...]}``
    hardware                  ack: the /api/hardware report
    generate                  a chat completion request (as POST /v1/chat/completions, plus an optional
                              ``id``), run on the same engine path; streamed to this client only:
                                  token           {"id", "delta", "timestamp"}, as text arrives
                                  reasoning       {"id", "delta", "timestamp"}, a thinking model's
                                                  thinking, before its tokens
                                  generate_done   {"id", "model", "text", "tool_calls", "finish_reason",
                                                   "usage", "timestamp", "reasoning"?}, the last event
                                  generate_error  {"id", "error": {OpenAI envelope}, "timestamp"}, instead
                              the ack is the last event's payload. A disconnect cancels the generation
                              and frees its slot in the engine at its next step.
    cancel                    {"id"}: stop one of this client's generations; ack {"id", "cancelled"}

Every payload carries ``timestamp``, the server's Unix time when it was published. A client joins
the rooms named in its connect ``auth`` (``{"rooms": ["metrics", "requests"]}``), by default
"metrics" and "models"; ``subscribe`` / ``unsubscribe`` change that later (the ack lists the rooms
now joined). The client library re-sends ``auth`` when it reconnects, so a dropped connection
resumes its streams by itself.

Replicas (IMPETUS_REDIS_URL): Socket.IO uses Redis as its message queue, so ``request_event``,
``model_event`` and ``pull_progress`` published on any replica reach the clients of every replica.
``metrics`` and ``hardware`` describe one process and stay on it, as do a client's own ``generate``
events (its connection is here). Every room event carries ``replica`` (``host:pid`` of the process
that published it), so a dashboard can tell the replicas apart. Those go to Redis from a thread of
their own (``Outbox``): a slow or unreachable Redis delays or drops them, never the engine thread
that publishes them. Without Redis: all in-process, emitted on the publisher's thread.

Handlers run in fresh threads: they never call MLX (work for the engine goes through its queue).
Events come from the engine's event bus and are emitted on the publisher's thread; ``emit`` only
queues the packet for each client's writer thread, so the engine thread is not held up.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from socketio import RedisManager

from gerdsen_ai_server.api.realtime.channel import Channel
from gerdsen_ai_server.api.realtime.fanout import Fanout, Outbox
from gerdsen_ai_server.api.realtime.transport import (
    bound_websocket_messages,
    close_idle_handshakes,
    close_websockets,
    socketio,
)
from gerdsen_ai_server.services import require, services
from gerdsen_ai_server.web.guard import OriginPolicy

__all__ = ["close_websockets", "init_realtime", "socketio"]

CHANNEL = Channel("/")
# Before any init_app, as the @socketio.on decorators were: every app's Socket.IO server gets it.
socketio.on_namespace(CHANNEL)


def init_realtime(app: Flask) -> None:
    """Socket.IO on ``app``, the channel's handlers, and its background tasks: the idle-handshake
    sweep, the outbox (with Redis), the monitor's loop; room events forwarded from the event bus."""
    options: dict[str, Any] = {}
    redis_url = services(app).settings.redis_url
    if redis_url:
        # A bounded connect: an unreachable Redis must not hold up the thread that publishes (the
        # engine's, for request and model events) for the kernel's TCP timeout. No read timeout: the
        # listener's subscription waits for messages indefinitely.
        options["client_manager"] = RedisManager(
            redis_url, channel="impetus-socketio", redis_options={"socket_connect_timeout": 2}
        )
    settings = services(app).settings
    limit = settings.max_request_bytes
    # Engine.IO checks Origin with the guard's policy (guard.py refuses first, in the API's envelope)
    # and, for an origin it allows, sends the CORS headers a cross-origin polling client needs.
    # (``[]``, as before, switched Engine.IO's Origin check off: any page could connect.)
    socketio.init_app(
        app,
        async_mode="threading",
        cors_allowed_origins=OriginPolicy(settings).allows,
        cors_credentials=False,
        max_http_buffer_size=limit,
        **options,
    )
    bound_websocket_messages(limit)
    socketio.start_background_task(close_idle_handshakes, socketio.sleep, settings.socket_connect_grace)
    outbox = Outbox() if redis_url else None
    if outbox is not None:
        socketio.start_background_task(outbox.run)
    found = services(app)
    found.engine.events.subscribe(Fanout(outbox).forward)
    monitor = require(found.monitor, "monitor")
    socketio.start_background_task(monitor.run, socketio.sleep)
