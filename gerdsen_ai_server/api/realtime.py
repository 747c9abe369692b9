"""Socket.IO channel. Threading mode over simple-websocket: Gunicorn's gthread worker carries it
(no eventlet: Gunicorn >= 26 has no eventlet worker). Metric and model events arrive in a later issue;
this module owns the one ``SocketIO`` object so they have a place to go."""

from __future__ import annotations

from flask import Flask
from flask_socketio import SocketIO

socketio = SocketIO()


def init_realtime(app: Flask) -> None:
    socketio.init_app(app, async_mode="threading", cors_allowed_origins=[])
