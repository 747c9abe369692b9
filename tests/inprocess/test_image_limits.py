"""Images in requests, in process (serving/images.py): every API refuses an image to a text model
with 400 ``model_not_supported`` naming the image where the client put it, and the operator's
bounds hold on every API before any model is asked: the count (400), the bytes (413, in the API's
own envelope), the schemes (file:// and the rest), http(s) while IMPETUS_ALLOW_IMAGE_URLS is off.
Bad images to a vision model (a tiny random Qwen2-VL, when mlx-vlm is installed) are 400s decoded
in serving, and the model answers the next good one; the decoding in detail is tests/unit/test_images.py's."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from gerdsen_ai_server.app import build_engine, create_app
from gerdsen_ai_server.config import Settings
from tests.inprocess.helpers import LLAMA, error_of, post


def png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "PNG")  # noise: a few KB that do not compress
    return buf.getvalue()


PNG = png()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def openai_parts(*urls: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "What is this?"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]


def request(api: str, *urls: str) -> tuple[str, dict[str, Any], str]:
    """The API's path, a body with these images in its first user turn, and where its first image is."""
    if api == "chat":
        body = {"model": LLAMA, "max_tokens": 2, "messages": [{"role": "user", "content": openai_parts(*urls)}]}
        return "/v1/chat/completions", body, "messages.0.content.1"
    if api in ("messages", "count_tokens"):
        blocks: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
        for u in urls:
            source = (
                {"type": "base64", "media_type": "image/png", "data": u.split(",", 1)[1]}
                if u.startswith("data:")
                else {"type": "url", "url": u}
            )
            blocks.append({"type": "image", "source": source})
        body = {"model": LLAMA, "system": "Be brief.", "messages": [{"role": "user", "content": blocks}]}
        if api == "messages":
            return "/v1/messages", {**body, "max_tokens": 2}, "messages.0.content.1"
        return "/v1/messages/count_tokens", body, "messages.0.content.1"
    if api == "responses":
        parts = [{"type": "input_text", "text": "What is this?"}] + [
            {"type": "input_image", "image_url": u} for u in urls
        ]
        body = {"model": LLAMA, "instructions": "Be brief.", "input": [{"role": "user", "content": parts}]}
        return "/v1/responses", {**body, "max_output_tokens": 2}, "input.0.content.1"
    body = {"model": LLAMA, "messages": [{"role": "user", "content": openai_parts(*urls)}]}
    return "/tokenize", body, "messages.0.content.1"


APIS = ["chat", "messages", "count_tokens", "responses", "tokenize"]


@pytest.mark.parametrize("api", APIS)
def test_an_image_to_a_text_model_is_model_not_supported(client: FlaskClient, api: str) -> None:
    path, body, where = request(api, DATA_URL)
    r = post(client, path, body)
    error = error_of(r)
    assert r.status_code == 400 and error["message"].startswith(f"{where}: the model '{LLAMA}' is a text model"), (
        r.status_code,
        error,
    )
    if api not in ("messages", "count_tokens"):  # Anthropic's envelope has no code or param
        assert error["code"] == "model_not_supported" and error["param"] == where


@pytest.fixture(scope="module")
def small(make_app: Callable[..., Flask]) -> FlaskClient:
    assert len(PNG) > 2048
    return make_app(max_images=2, max_image_bytes=2048).test_client()


@pytest.mark.parametrize("api", APIS)
def test_the_bounds_hold_on_every_api_before_the_model_is_asked(small: FlaskClient, api: str) -> None:
    path, body, where = request(api, DATA_URL)
    r = post(small, path, body)
    assert r.status_code == 413 and "IMPETUS_MAX_IMAGE_BYTES" in error_of(r)["message"], r.get_data(as_text=True)
    assert error_of(r)["message"].startswith(where)
    path, body, where = request(api, "data:image/png;base64,AAAA", "data:image/png;base64,AAAA", DATA_URL)
    r = post(small, path, body)
    assert r.status_code == 400 and "at most 2 images" in error_of(r)["message"]
    for url, why in (
        ("file:///etc/passwd", "scheme 'file' are refused"),
        ("http://169.254.169.254/latest/meta-data/", "IMPETUS_ALLOW_IMAGE_URLS is off"),
    ):
        path, body, where = request(api, url)
        r = post(small, path, body)
        assert r.status_code == 400 and why in error_of(r)["message"] and error_of(r)["message"].startswith(where)


def test_images_only_in_user_turns(client: FlaskClient) -> None:
    body = {
        "model": LLAMA,
        "max_tokens": 2,
        "messages": [{"role": "assistant", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}],
    }
    r = post(client, "/v1/messages", body)
    assert r.status_code == 400 and "image blocks are only allowed in user messages" in error_of(r)["message"]
    r = post(client, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200  # and the app still serves


# ---- bad images to a vision model: decoded in serving, a 400 each, and the engine keeps serving ----

VLM = "tiny-vlm"


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory, settings: dict[str, Any]) -> Iterator[FlaskClient]:
    """An app over an engine of its own whose models dir holds a tiny random Qwen2-VL (tests/support/tiny_vlm.py)."""
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (make setup installs it: requirements-vision.txt)")
    from tests.support.models import default_model_folder
    from tests.support.tiny_vlm import build_tiny_qwen2_vl

    folder = tmp_path_factory.mktemp("vision-models")
    build_tiny_qwen2_vl(folder / VLM, default_model_folder())
    config = {**settings, "models_dir": str(folder)}
    engine = build_engine(Settings.from_mapping(config))
    engine.start()
    try:
        app = create_app(config, engine=engine)
        app.testing = True
        yield app.test_client()
    finally:
        engine.shutdown()


def noise(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def bomb() -> bytes:
    """A PNG whose header claims 8,000 x 8,000 pixels (64 Mpx) over a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 8_000, 8_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_bad_images_to_a_vision_model_are_400s_and_it_keeps_serving(vision: FlaskClient) -> None:
    good, jpeg = noise("PNG"), noise("JPEG")
    cases = [
        (url(good[: len(good) // 2]), "truncated or corrupt"),
        (url(jpeg[: len(jpeg) // 2], "image/jpeg"), "truncated or corrupt"),
        (url(bomb()), "8000x8000 pixels"),
        (url(jpeg), "declared image/png but its bytes are image/jpeg"),
        (url(b"GIF89a" + bytes(30), "image/gif"), "'image/gif' are not supported"),
        (url(b"<svg/>"), "not a PNG, JPEG or WebP"),
    ]
    for image, said in cases:
        path, body, where = request("chat", image)
        r = post(vision, path, {**body, "model": VLM})
        error = error_of(r)
        assert r.status_code == 400 and error["param"] == where and said in error["message"], (r.status_code, error)
    for api in ("messages", "responses"):  # the other APIs name the part where their client put it
        path, body, where = request(api, url(good[:100]))
        r = post(vision, path, {**body, "model": VLM})
        assert r.status_code == 400 and error_of(r)["message"].startswith(f"{where}: the image could not be decoded")
    path, body, _ = request("chat", url(good))
    r = post(vision, path, {**body, "model": VLM, "max_tokens": 2})
    assert r.status_code == 200 and r.get_json()["usage"]["completion_tokens"] == 2, r.get_data(as_text=True)[:300]


def test_vision_models_are_marked_on_both_listings(vision: FlaskClient, client: FlaskClient) -> None:
    post(vision, "/api/models/load", {"model": VLM})
    cards = {c["id"]: c for c in vision.get("/v1/models").get_json()["data"]}
    listed = {m["id"]: m for m in vision.get("/api/models").get_json()["data"]}
    assert "vision" in cards[VLM]["capabilities"] and listed[VLM]["vision"] is True
    post(client, "/api/models/load", {"model": LLAMA})
    cards = {c["id"]: c for c in client.get("/v1/models").get_json()["data"]}
    listed = {m["id"]: m for m in client.get("/api/models").get_json()["data"]}
    assert "vision" not in cards[LLAMA]["capabilities"] and listed[LLAMA]["vision"] is False
