"""serving/chat.py ``with_image_parts``: a message's image parts go back into the very message they came
in, also when tools described in the prompt put a system message first."""

from __future__ import annotations

from gerdsen_ai_server.schemas.openai import ChatCompletionRequest
from gerdsen_ai_server.serving.chat import with_image_parts

URL = "data:image/png;base64,iVBORw0KGgo="


def test_image_parts_land_in_their_own_message() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": URL}}, {"type": "text", "text": "and?"}],
                },
            ],
        }
    )
    rendered = [{"role": m.role, "content": m.text()} for m in body.messages]
    tools = [{"role": "system", "content": "You can call these functions..."}, *rendered]
    for messages, at in ((rendered, 2), (tools, 3)):
        out = with_image_parts(body, messages)
        assert out[at]["content"] == [{"type": "image"}, {"type": "text", "text": "and?"}]
        assert [m for i, m in enumerate(out) if i != at] == [m for i, m in enumerate(messages) if i != at]
