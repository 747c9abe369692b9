"""Test images for the vision tests: a seeded random PNG, its data: URL, and a chat message holding it."""

from __future__ import annotations

import base64
import io
from typing import Any

QUESTION = "What is in this picture?"


def png(seed: int, size: int = 512) -> bytes:
    """A ``size`` x ``size`` PNG of seeded noise: two seeds, two images; one seed, the same bytes."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_message(image: bytes, text: str = QUESTION) -> list[dict[str, Any]]:
    """One user message: the image (an OpenAI ``image_url`` part), then the question."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]
