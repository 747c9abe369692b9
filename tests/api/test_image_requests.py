"""Images through the official SDKs against the real server, on its default (text) model: each API
answers an image with 400 ``model_not_supported`` naming the image where the client put it, and bad
images (a host file, a private URL, too many) are 400s in the API's envelope while the server keeps
serving. Decoding itself is tests/unit/test_images.py's; a vision model's answers, tests/api/test_vision.py's."""

from __future__ import annotations

import base64
import io
from typing import Any

import anthropic
import openai
import pytest
from PIL import Image

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


B64 = png()
DATA_URL = f"data:image/png;base64,{B64}"
NOT_VISION = f"the model '{DEFAULT_MODEL}' is a text model and cannot take images"


def user(*urls: str) -> list[Any]:
    parts = [{"type": "text", "text": "What is this?"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0, timeout=60)


def test_openai_chat_image_to_a_text_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=5, messages=user(DATA_URL))
    body = info.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_supported" and body["param"] == "messages.0.content.1"
    assert body["message"].startswith(f"messages.0.content.1: {NOT_VISION}")


def test_responses_input_image_to_a_text_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=DEFAULT_MODEL,
            max_output_tokens=16,
            instructions="Be brief.",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": DATA_URL, "detail": "auto"},
                    ],
                }
            ],
        )
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_supported" and body["param"] == "input.0.content.1"


@pytest.mark.parametrize("route", ["create", "count_tokens"])
def test_anthropic_image_block_to_a_text_model(claude: anthropic.Anthropic, route: str) -> None:
    call = claude.messages.create if route == "create" else claude.messages.count_tokens
    kwargs: dict[str, Any] = {"max_tokens": 5} if route == "create" else {}
    with pytest.raises(anthropic.BadRequestError) as info:
        call(
            model=DEFAULT_MODEL,
            system="Be brief.",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
                    ],
                }
            ],
            **kwargs,
        )
    error = info.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(
        f"messages.0.content.1: {NOT_VISION}"
    )


BAD = [
    (["file:///etc/passwd"], "scheme 'file' are refused"),
    (["http://127.0.0.1:1/a.png"], "IMPETUS_ALLOW_IMAGE_URLS is off"),
    (["http://169.254.169.254/latest/meta-data/"], "IMPETUS_ALLOW_IMAGE_URLS is off"),
    ([DATA_URL] * 9, "at most 8 images per request"),
    (["data:image/svg+xml;base64,PHN2Zy8+"], NOT_VISION),  # a text model's answer comes before any decode
]


def test_bad_images_are_400s_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    for urls, said in BAD:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=5, messages=user(*urls))
        assert said in str(info.value.message), info.value.message
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=3, messages=[{"role": "user", "content": "Hi"}], temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
