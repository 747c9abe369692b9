"""Payloads a Socket.IO client sends (api/realtime/): each is validated here, like an HTTP body,
and a bad one is answered with OpenAI's error envelope."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from gerdsen_ai_server.schemas.limits import check_json_value
from gerdsen_ai_server.schemas.openai import REQUEST_CONFIG, ChatCompletionRequest

Room = Literal["metrics", "requests", "models"]
ROOMS: tuple[Room, ...] = ("metrics", "requests", "models")
GENERATION_ID = r"^[A-Za-z0-9._:-]{1,64}$"


def _rooms_shorthand(data: Any) -> Any:
    """``"metrics"``, ``["metrics", ...]`` and ``{"room": "metrics"}`` mean ``{"rooms": [...]}``."""
    if isinstance(data, str | list):
        data = {"rooms": data}
    if isinstance(data, dict) and "room" in data and "rooms" not in data:
        data = {**data, "rooms": data["room"]}
        del data["room"]
    if isinstance(data, dict) and isinstance(data.get("rooms"), str):
        data = {**data, "rooms": [data["rooms"]]}
    return data


class ConnectAuth(BaseModel):
    """The connect ``auth`` payload."""

    model_config = REQUEST_CONFIG

    api_key: str | None = Field(None, description="One of the server's API keys (when it has any).")
    rooms: list[Room] | None = Field(None, max_length=len(ROOMS), description="Rooms to join; default metrics, models.")

    _shorthand = model_validator(mode="before")(_rooms_shorthand)


class RoomsRequest(BaseModel):
    """``subscribe`` / ``unsubscribe``."""

    model_config = REQUEST_CONFIG

    rooms: list[Room] = Field(max_length=len(ROOMS))

    _shorthand = model_validator(mode="before")(_rooms_shorthand)


class GenerateRequest(ChatCompletionRequest):
    """``generate``: a chat completion request, streamed back to this client as ``token`` events.

    Its payload was parsed by python-socketio, not ``parse_body``: the same nesting and finite-number
    limits are applied here, before the fields are (the ``Any`` parts, tool parameters and JSON
    schemas, are not typed finely enough for the schema to see a NaN in them)."""

    id: str | None = Field(
        None,
        pattern=GENERATION_ID,
        description="The client's name for this generation, echoed in its events; default: one made up.",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_limits(cls, data: Any) -> Any:
        check_json_value(data)  # a ValueError: pydantic reports it as this payload's validation error
        return data


class CancelRequest(BaseModel):
    """``cancel``: stop one of this client's generations."""

    model_config = REQUEST_CONFIG

    id: str = Field(pattern=GENERATION_ID)
