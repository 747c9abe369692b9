"""The Socket.IO channel's handlers: one ``Namespace`` class (``/``), one ``on_<event>`` method per event.

Its state is its sessions': the key each connected with (its rate-limit bucket) and their running
generations. Every handler runs in a fresh thread (python-socketio's async handlers) inside a Flask
request context made from the session's handshake, so ``request.sid``, ``rooms()`` and ``emit``
name the caller; none calls MLX (work for the engine goes through its queue). Each event, unknown
ones included, spends the caller's IMPETUS_RATE_LIMIT budget as an HTTP request does; past it the
ack is the 429 envelope and the event does nothing. Payloads are validated by schemas/realtime.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from flask import request
from flask_socketio import ConnectionRefusedError, Namespace, emit, join_room, leave_room, rooms
from pydantic import ValidationError

from gerdsen_ai_server.api.realtime.generate import Generations, generate, refusal
from gerdsen_ai_server.schemas.realtime import CancelRequest, ConnectAuth, RoomsRequest
from gerdsen_ai_server.services import require, services
from gerdsen_ai_server.web.errors import APIError
from gerdsen_ai_server.web.guard import KEY_ID
from gerdsen_ai_server.web.keys import key_id
from gerdsen_ai_server.web.rate_limits import spend_budget

DEFAULT_ROOMS = ("metrics", "models")


def _sid() -> str:
    return str(request.sid)  # type: ignore[attr-defined]


def _joined() -> list[str]:
    sid = _sid()
    return sorted(r for r in rooms() if r != sid)


def _hardware() -> dict[str, Any]:
    report = require(services().monitor, "monitor").hardware_report().model_dump()
    report["timestamp"] = time.time()
    return report


def _invalid(exc: ValidationError | APIError) -> dict[str, Any]:
    """OpenAI's envelope for a payload that failed validation (or was refused)."""
    return refusal(exc).envelope()


class Channel(Namespace):
    """The handlers of namespace ``/`` (see the package's doc for the events and their payloads)."""

    def __init__(self, namespace: str = "/") -> None:
        super().__init__(namespace)
        self.generations = Generations()
        self.key_ids: dict[str, str] = {}  # sid -> the id of the key it connected with: its rate-limit bucket

    def trigger_event(self, event: str, *args: Any) -> Any:
        """``on_<event>``; an event with no method goes to ``unknown_event`` instead of being
        ignored (Flask-SocketIO's documented way to catch every event in a class)."""
        if hasattr(self, "on_" + (event or "")):
            return super().trigger_event(event, *args)
        handler: Callable[..., Any] = functools.partial(self.unknown_event, event)
        return self.socketio._handle_event(handler, event, self.namespace, *args)

    def on_connect(self, auth: Any = None) -> None:
        try:
            given = ConnectAuth.model_validate(auth or {})
        except ValidationError as exc:
            envelope = _invalid(exc)
            raise ConnectionRefusedError(f"invalid_request_error: {envelope['error']['message']}", envelope) from None
        found = services()
        checker = found.keys
        if checker:
            # The guard let the handshake in with a valid key (its id is in the session's environ); a key
            # in ``auth`` as well must be right too, and then names the rate-limit bucket.
            ident = request.environ.get(KEY_ID)
            if given.api_key is not None:
                ident = key_id(given.api_key) if checker.matches(given.api_key) else None
            if ident is None:
                logins = found.failed_logins
                if logins is not None:  # a failed login, as over HTTP: no guessing keys here instead
                    logins.fail(request.remote_addr)
                envelope = APIError(401, "Incorrect API key provided.", code="invalid_api_key").envelope()
                raise ConnectionRefusedError(f"invalid_api_key: {envelope['error']['message']}", envelope)
            self.key_ids[_sid()] = ident
        for room in given.rooms if given.rooms is not None else DEFAULT_ROOMS:
            join_room(room)
        if "metrics" in _joined():
            emit("hardware", _hardware())

    def on_disconnect(self, *_reason: Any) -> None:
        self.generations.cancel(_sid())  # free the engine slots of whatever this client was generating
        self.key_ids.pop(_sid(), None)

    def _over_budget(self) -> APIError | None:
        """Spend one request of the caller's IMPETUS_RATE_LIMIT budget for this event: the 429 past it."""
        try:
            spend_budget(self.key_ids.get(_sid()), request.remote_addr)
        except APIError as exc:
            return exc
        return None

    def on_subscribe(self, data: Any = None) -> dict[str, Any]:
        return self._change(data, join_room)

    def on_unsubscribe(self, data: Any = None) -> dict[str, Any]:
        return self._change(data, leave_room)

    def _change(self, data: Any, action: Any) -> dict[str, Any]:
        refused = self._over_budget()
        if refused is not None:
            return {**refused.envelope(), "rooms": _joined()}
        try:
            wanted = RoomsRequest.model_validate(data)
        except ValidationError as exc:
            return {**_invalid(exc), "rooms": _joined()}
        for room in wanted.rooms:
            action(room)
        return {"rooms": _joined()}

    def on_hardware(self, _data: Any = None) -> dict[str, Any]:
        """The hardware report, as this event's acknowledgement (the monitor caches it for a second:
        a client asking in a loop does not run the probes, nvidia-smi among them, each time)."""
        refused = self._over_budget()
        return refused.envelope() if refused is not None else _hardware()

    def on_cancel(self, data: Any = None) -> dict[str, Any]:
        refused = self._over_budget()
        if refused is not None:
            return refused.envelope()
        try:
            wanted = CancelRequest.model_validate(data)
        except ValidationError as exc:
            return _invalid(exc)
        return {"id": wanted.id, "cancelled": self.generations.cancel(_sid(), wanted.id) > 0}

    def on_generate(self, data: Any = None) -> dict[str, Any]:
        """Runs in its own thread (python-socketio's async handlers), like an SSE stream in a request thread."""
        return generate(self.generations, self.key_ids, _sid(), data)

    def unknown_event(self, event: str, _data: Any = None) -> dict[str, Any]:
        """An event this server does not know still spends the budget (else a free flood), then says so."""
        refused = self._over_budget()
        if refused is not None:
            return refused.envelope()
        return APIError(400, f"Unknown event '{str(event)[:100]}'.", code="unknown_event").envelope()
