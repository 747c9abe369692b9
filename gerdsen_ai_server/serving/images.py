"""Images in chat requests: found, bounded, decoded and refused for a text model, before the engine.

All three APIs reach here as an OpenAI chat request (Anthropic ``image`` blocks and Responses
``input_image`` parts become ``image_url`` parts; their own locations are kept for errors). In
order, cheapest first: ``check_images`` (the count, the scheme, a data: URL's size: before any
model is loaded), ``require_vision`` (a text model gets 400 ``model_not_supported``, as vLLM
answers an image to a text-only model), then ``load_images`` (the bytes: base64 decoded or the URL
fetched, serving/image_fetch.py; the type read from the magic bytes and matched with the declared
one; the dimensions from the header bounded before any pixel is decoded, then the whole image
decoded, so a truncated or corrupt file is a 400 here and never an error in the engine).
``images_for`` is what the chat path calls; ``template_content`` gives a message's content as a
vision model's chat template reads it: HF's ``{"type": "image"}`` placeholder where each image was.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, ChatMessage, TextPart
from gerdsen_ai_server.schemas.parts import ImagePart
from gerdsen_ai_server.schemas.responses import ContentPart, InputImage, InputMessage
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.image_fetch import IPAddress, fetch, is_public

# What a vision model's processor takes, by content type; Pillow's format name for each.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
PLACEHOLDER: dict[str, Any] = {"type": "image"}  # HF chat templates' image part (Qwen2-VL, SmolVLM, Gemma 3...)
_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    """The operator's bounds (IMPETUS_MAX_IMAGES, _MAX_IMAGE_BYTES, _MAX_IMAGE_PIXELS, _ALLOW_IMAGE_URLS,
    _IMAGE_URL_TIMEOUT)."""

    max_images: int = 8
    max_bytes: int = 20 << 20
    max_pixels: int = 1 << 25
    allow_urls: bool = False
    url_timeout: float = 10.0

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(
            settings.max_images,
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.allow_image_urls,
            settings.image_url_timeout,
        )


def _limits(limits: ImageLimits | None) -> ImageLimits:
    return limits if limits is not None else ImageLimits.of(services().settings)


def image_parts(chat: ChatCompletionRequest) -> list[tuple[str, ImagePart]]:
    """Every image part in message order, with its place as the client sent it (``messages.N.content.M``,
    or the Anthropic or Responses place a converter labelled it with)."""
    return [
        (part.image_url.where or f"messages.{i}.content.{j}", part)
        for i, message in enumerate(chat.messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, ImagePart)
    ]


def label_images(chat: ChatCompletionRequest, places: list[str]) -> ChatCompletionRequest:
    """``chat`` with its image parts labelled, in order, with their places in the original request
    (an Anthropic or Responses one): errors then name what the client sent."""
    parts = image_parts(chat)
    if len(parts) == len(places):  # else (a conversation the converter did not build whole) the chat's places
        for (_, part), place in zip(parts, places, strict=True):
            part.image_url.label(place)
    return chat


def _bad(where: str, why: str, code: str = "invalid_image", status: int = 400) -> APIError:
    return APIError(status, f"{where}: {why}", param=where, code=code)


def check_images(chat: ChatCompletionRequest, limits: ImageLimits | None = None) -> None:
    """What can be refused without a model or a decode: too many images, a scheme other than data:
    or http(s) (file:// above all), http(s) while the operator has not allowed fetching, a data: URL
    whose base64 is already too long."""
    parts, bounds = image_parts(chat), _limits(limits)
    if len(parts) > bounds.max_images:
        where = parts[bounds.max_images][0]
        raise _bad(where, f"at most {bounds.max_images} images per request (IMPETUS_MAX_IMAGES)", "invalid_value")
    for where, part in parts:
        url = part.image_url.url
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            payload = len(url) - url.find(",") - 1 if "," in url else 0
            if payload * 3 // 4 > bounds.max_bytes + 2:  # base64: 4 characters per 3 bytes
                raise _too_large(where, bounds.max_bytes)
        elif scheme in ("http", "https"):
            if not bounds.allow_urls:
                raise _bad(
                    where,
                    "http(s) image URLs are not fetched by this server (IMPETUS_ALLOW_IMAGE_URLS is off); send the "
                    "image as a data: URL (base64)",
                    "invalid_image_url",
                )
        else:
            raise _bad(
                where,
                f"image URLs of scheme '{scheme[:20]}' are refused: send a data: URL (base64 PNG, JPEG or WebP)",
                "invalid_image_url",
            )


def has_vision(loaded: LoadedModel) -> bool:
    """Whether the model's backend takes images (``Capabilities.vision``)."""
    resident = services().engine.registry.get(loaded.model_id)
    return resident is not None and resident.backend.capabilities.vision


def require_vision(chat: ChatCompletionRequest, loaded: LoadedModel) -> None:
    """400 ``model_not_supported`` naming the first image, when the model cannot see."""
    parts = image_parts(chat)
    if parts and not has_vision(loaded):
        where = parts[0][0]
        raise _bad(
            where,
            f"the model '{loaded.model_id}' is a text model and cannot take images; use a vision model",
            "model_not_supported",
        )


def load_images(
    chat: ChatCompletionRequest, limits: ImageLimits | None = None, allow: Callable[[IPAddress], bool] = is_public
) -> list[ImageInput]:
    """The request's images in message order, each decoded and within the bounds. ``allow``: the
    fetch's address check (tests only replace it)."""
    bounds = _limits(limits)
    check_images(chat, bounds)
    return [decode_url(part.image_url.url, where, bounds, allow) for where, part in image_parts(chat)]


def images_for(chat: ChatCompletionRequest, loaded: LoadedModel) -> tuple[list[dict[str, Any]], list[ImageInput]]:
    """For the chat path: the messages with a placeholder where each image was, and the images, in
    the same order; a 400 for a text model given an image, or for an image out of bounds."""
    check_images(chat)
    require_vision(chat, loaded)
    images = load_images(chat)
    messages = [
        {**m.model_dump(exclude_none=True, exclude={"content"}), "content": template_content(m)} for m in chat.messages
    ]
    return messages, images


def template_content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """A message's content for the chat template: its text, or, with images, its parts in order, each
    image as HF's ``{"type": "image"}`` (a vision template writes its image tokens there)."""
    content = message.content
    if not isinstance(content, list) or not any(isinstance(p, ImagePart) for p in content):
        return message.text()
    return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else dict(PLACEHOLDER) for p in content]


def decode_url(url: str, where: str, limits: ImageLimits, allow: Callable[[IPAddress], bool] = is_public) -> ImageInput:
    """One image part's URL as a checked image: a data: URL decoded, an http(s) one fetched."""
    if url[:5].lower() == "data:":
        data, declared = _data_url(url, where, limits)
    else:  # check_images has refused every other scheme, and http(s) unless allowed
        data, declared = fetch(url, where, limits.max_bytes, limits.url_timeout, allow), None
    return decode_image(data, declared, where, limits)


def _data_url(url: str, where: str, limits: ImageLimits) -> tuple[bytes, str]:
    match = _DATA_URL.match(url)
    if match is None:
        raise _bad(where, "not a valid data: URL (data:image/png;base64,...)")
    declared = match.group(1).strip().lower()
    if declared not in FORMATS:
        raise _bad(where, f"images of type '{declared[:50]}' are not supported (PNG, JPEG or WebP)")
    if "base64" not in [p.strip().lower() for p in match.group(2).split(";")]:
        raise _bad(where, "an image data: URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode("".join(url[match.end() :].split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(where, "the image's base64 is not valid") from None
    if len(data) > limits.max_bytes:
        raise _too_large(where, limits.max_bytes)
    return data, declared


def sniff(data: bytes) -> str | None:
    """The content type the bytes' magic number says, among those taken."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_image(data: bytes, declared: str | None, where: str, limits: ImageLimits) -> ImageInput:
    """The bytes as a checked image: a PNG, JPEG or WebP (by its magic, matching ``declared``), at most
    ``max_pixels`` by its header (a decompression bomb is refused before it is decompressed), and
    decoded whole (a truncated or corrupt file is a 400)."""
    if len(data) > limits.max_bytes:
        raise _too_large(where, limits.max_bytes)
    mime = sniff(data)
    if mime is None:
        raise _bad(where, "the image is not a PNG, JPEG or WebP file")
    if declared is not None and declared != mime:
        raise _bad(where, f"the image was declared {declared} but its bytes are {mime}")
    try:
        # Image.open reads the header only (and refuses past twice Pillow's own MAX_IMAGE_PIXELS).
        with Image.open(io.BytesIO(data), formats=[FORMATS[mime]]) as image:
            width, height = image.size
            if width < 1 or height < 1 or width * height > limits.max_pixels:
                raise _bad(
                    where,
                    f"the image is {width}x{height} pixels, over the {limits.max_pixels} allowed "
                    "(IMPETUS_MAX_IMAGE_PIXELS): refused before decoding",
                )
            image.load()  # every pixel: a truncated or corrupt file fails here, not in the engine
            decoded = image.convert("RGB")  # what the vision backend feeds its processor
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise _bad(where, "the image is a decompression bomb (too many pixels for its size)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        detail = re.sub(r" ?<[^>]*>", "", str(exc))[:100]  # no object reprs ("<_io.BytesIO object at 0x...>")
        raise _bad(where, f"the image could not be decoded (truncated or corrupt: {detail})") from None
    return ImageInput(data, mime, width, height, hashlib.sha256(data).hexdigest(), decoded)


def _too_large(where: str, max_bytes: int) -> APIError:
    return _bad(where, f"the image is larger than {max_bytes} bytes (IMPETUS_MAX_IMAGE_BYTES)", "image_too_large", 413)


def input_content(item: InputMessage, place: str) -> str | list[dict[str, Any]]:
    """A Responses input message's content for the chat request: its text, or its text and
    ``input_image`` parts as OpenAI chat parts (labelled with ``place`` for errors: serving/responses.py)."""
    content = item.content
    if isinstance(content, str) or not any(isinstance(p, InputImage) for p in content):
        return item.text()
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, ContentPart):
            parts.append({"type": "text", "text": part.text})
            continue
        where = f"{place}.content.{j}"
        if item.role != "user":
            raise _bad(where, "input_image parts are only allowed in user messages", "unsupported_content")
        if part.image_url is None:
            why = (
                "file_id needs OpenAI's Files API, which this server does not have" if part.file_id else "no image_url"
            )
            raise _bad(where, f"{why}; send the image as image_url (a data: URL)", "invalid_value")
        parts.append({"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail}})
    return parts
