"""Request ids and the request log: one line per request, as text or JSON (``IMPETUS_LOG_FORMAT``).

* ``X-Request-ID``: a client's id is kept when it is a short token (so it cannot forge log lines or
  headers); otherwise, or when there is none, one is made. Every response echoes it, errors included,
  and every log line written while the request runs carries it.
* One ``impetus.access`` line per request, written when the response is closed, so a stream's
  duration is the whole stream: method, route, path, status, duration, client address and the
  key's id (a hash prefix, never the key). Bodies, prompts and headers are never logged. The path
  is the client's, decoded: its control characters (``%0A`` is a newline) are written escaped
  (``\\x0a``), so that no request can end its line and forge another (CWE-117), in the text format or
  in a JSON reader that splits on them.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, has_request_context, request

HEADER = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
# Fields a record may carry (``extra=``) that the JSON formatter writes as their own keys.
FIELDS = ("request_id", "method", "route", "path", "status", "duration_ms", "remote", "key_id", "stream")

access_log = logging.getLogger("impetus.access")
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: what ends or rewrites a line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x0a``, ``\\u2028``)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def request_id() -> str | None:
    return g.get("request_id") if has_request_context() else None


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None and value != "-":
                out[field] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger writes to stderr in the chosen format; idempotent (the factory may run twice)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if getattr(handler, "impetus", False):
            handler.setFormatter(formatter(log_format))
            return
    handler = logging.StreamHandler()
    handler.impetus = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)


def _begin() -> None:
    given = request.headers.get(HEADER, "")
    g.request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    g.request_started = time.perf_counter()


def _finish(response: Response) -> Response:
    rid = g.get("request_id") or uuid.uuid4().hex  # a hook before ours failed: still answer with one
    response.headers[HEADER] = rid
    fields = {
        "request_id": rid,
        "method": printable(request.method),
        "route": request.url_rule.rule if request.url_rule is not None else None,
        "path": printable(request.path),
        "status": response.status_code,
        "remote": request.remote_addr,
        "key_id": g.get("api_key_id"),
        "stream": response.is_streamed or None,
    }
    started = g.get("request_started", time.perf_counter())

    def log_line() -> None:
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
        access_log.info(
            "%s %s %s %.1fms", fields["method"], fields["path"], fields["status"], fields["duration_ms"], extra=fields
        )

    response.call_on_close(log_line)
    return response


def init_request_log(app: Flask) -> None:
    """Register first, so every later hook and handler already has the request id."""
    app.before_request_funcs.setdefault(None, []).insert(0, _begin)
    app.after_request(_finish)
