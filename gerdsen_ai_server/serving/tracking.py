"""Which streams this request generates, for the request metrics: ``track(streams)`` after submitting.

Routes that generate call ``track(streams)`` once they have submitted: it announces a
``request_event`` (started) and leaves the streams with the request, so that when the response
closes (an SSE stream: its last byte) web/request_metrics.py measures their time to first token,
tokens and tok/s and announces them finished. A generation answered outside an HTTP response
(Socket.IO ``generate``) calls ``finish_tracking`` itself when it is done. The measuring is
monitoring/request_events.py's, with no Flask; what is Flask here is only where the streams wait
(the request's ``g``).
"""

from __future__ import annotations

from flask import g, request

from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.monitoring.request_events import publish_finished, publish_started
from gerdsen_ai_server.services import require, services


def track(streams: list[TokenStream]) -> None:
    """Called by a generating route after submitting: measure these streams when the response closes."""
    if not streams:
        return
    g.impetus_streams = streams
    publish_started(services().engine.events, streams, route())


def tracked_streams() -> list[TokenStream]:
    """The streams ``track`` left with this request (none for a request that generated nothing)."""
    streams: list[TokenStream] = g.get("impetus_streams", [])
    return streams


def route() -> str:
    """What request events name as the route: the path, or the Socket.IO event that generated."""
    return g.get("impetus_route") or request.path


def finish_tracking(streams: list[TokenStream], status: int, elapsed: float) -> None:
    """For generations answered outside an HTTP response (Socket.IO ``generate``): measure the
    streams and publish ``request_event`` finished, as the response's close does over HTTP."""
    if streams:
        found = services()
        publish_finished(require(found.metrics, "metrics"), found.engine.events, streams, route(), status, elapsed)
