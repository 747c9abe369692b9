"""Chat content parts beyond text: the ``image_url`` part a vision model takes, and the media parts
no model here can take, refused by name before the schema sees them.

Without the refusal an ``input_audio`` part in an OpenAI chat message fails every branch of
``content: str | list[...]`` and pydantic reports the first one: the misleading
``Invalid value for 'messages.0.content.str': Input should be a valid string``. Here it is a 400
naming the part's type and place, as llama.cpp's server does. An ``image_url`` part passes in a
user message (OpenAI's rule: images are user input); whether the model can see it is the serving
layer's check (serving/images.py), once the model is known.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from gerdsen_ai_server.errors import APIError

# Parts that carry media no model here takes (audio, files, video): refused by name.
MEDIA_PARTS = frozenset({"input_audio", "file", "input_image", "input_file", "video_url"})
TEXT_PARTS = frozenset({"text"})
IMAGE_PART = "image_url"


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str  # a data: URL (base64 PNG, JPEG or WebP), or http(s) when IMPETUS_ALLOW_IMAGE_URLS is on
    # OpenAI's resolution hint. Accepted and not acted on: the model's own processor sizes the image,
    # as vLLM and llama-server do (neither has a low-detail mode).
    detail: Literal["auto", "low", "high"] | None = None
    # Where the client put it when that was not this chat message (an Anthropic block, a Responses
    # part): set by the converters (serving/images.py ``label_images``) so errors name it there.
    _where: str | None = PrivateAttr(None)

    @property
    def where(self) -> str | None:
        return self._where

    def label(self, where: str) -> None:
        self._where = where


class ImagePart(BaseModel):
    """OpenAI's ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["image_url"]
    image_url: ImageURL


def refuse_unsupported_parts(data: Any) -> Any:
    """A raw chat request unchanged, or a 400 naming its first content part that no model here takes
    (or an image outside a user message)."""
    messages = data.get("messages") if isinstance(data, dict) else None
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        user = isinstance(message, dict) and message.get("role") == "user"
        allowed = TEXT_PARTS | {IMAGE_PART} if user else TEXT_PARTS
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == IMAGE_PART and user:
                _check_image_part(part, f"messages.{i}.content.{j}")
            if isinstance(kind, str) and kind not in allowed:
                if kind == IMAGE_PART:
                    why = "are only allowed in user messages"
                elif kind in MEDIA_PARTS:
                    why = "are not supported by this server (it takes text and images)"
                else:
                    why = f"are not supported (allowed: {', '.join(sorted(allowed))})"
                raise APIError(
                    400,
                    f"messages.{i}.content.{j}: content parts of type '{kind[:50]}' {why}",
                    param=f"messages.{i}.content.{j}",
                    code="unsupported_content",
                )
    return data


def _check_image_part(part: Any, where: str) -> None:
    """An image part's own problem named inside it (``messages.0.content.1.image_url.url``): in the
    message's ``str | list`` union pydantic would report the str branch's "Input should be a valid string"."""
    try:
        ImagePart.model_validate(part)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join([where, *(str(p) for p in first["loc"])])
        if first["type"] == "extra_forbidden":
            raise APIError(
                400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            ) from None
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code=code) from None
