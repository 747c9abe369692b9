"""Running requests, for the operator: ``GET /api/requests`` lists them, ``DELETE /api/requests/<id>``
cancels one. The table, and the watch that ends work nobody waits for any more, are
serving/running.py's.

The admin scope of these routes is enforced with the other management routes in web/keys.py.
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.requests import RunningRequestList
from gerdsen_ai_server.serving.running import table

bp = Blueprint("requests", __name__, url_prefix="/api/requests")
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


@bp.get("")
def list_requests() -> Response:
    return jsonify(RunningRequestList(data=[e.describe() for e in table().running()]).model_dump())


@bp.delete("/<request_id>")
def cancel_request(request_id: str) -> Response:
    if not REQUEST_ID.fullmatch(request_id):
        raise APIError(
            400,
            "A request id is 32 lowercase hex digits, as GET /api/requests lists them.",
            param="id",
            code="invalid_value",
        )
    entry = table().get(request_id)
    if entry is None:
        raise APIError(404, f"No request '{request_id}' is running.", param="id", code="request_not_found")
    entry.cancel()
    return jsonify(entry.describe().model_dump())
