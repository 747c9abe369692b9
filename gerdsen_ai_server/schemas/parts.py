"""Content parts a text model cannot take, refused by name before the schema sees them.

Without this check an ``image_url`` part in an OpenAI chat message fails every branch of
``content: str | list[TextPart]`` and pydantic reports the first one: the misleading
``Invalid value for 'messages.0.content.str': Input should be a valid string``. Here it is a 400
naming the part's type and place, as llama.cpp's server does for a text-only model.
"""

from __future__ import annotations

from typing import Any

from gerdsen_ai_server.errors import APIError

# Parts that carry media: refused until the vision issue lands.
MEDIA_PARTS = frozenset({"image_url", "input_audio", "file", "input_image", "input_file", "video_url"})
TEXT_PARTS = frozenset({"text"})


def refuse_unsupported_parts(data: Any) -> Any:
    """A raw chat request unchanged, or a 400 naming its first content part that is not text."""
    allowed = TEXT_PARTS
    messages = data.get("messages") if isinstance(data, dict) else None
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in allowed:
                why = (
                    "are not supported by this text model"
                    if kind in MEDIA_PARTS
                    else f"are not supported (allowed: {', '.join(sorted(allowed))})"
                )
                raise APIError(
                    400,
                    f"messages.{i}.content.{j}: content parts of type '{kind[:50]}' {why}",
                    param=f"messages.{i}.content.{j}",
                    code="unsupported_content",
                )
    return data
