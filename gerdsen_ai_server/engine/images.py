"""An image a request carries into the engine: its decoded bytes, size and content hash.

The serving layer builds these (serving/images.py: decoding, bounds, fetching) from the three APIs'
image parts; a vision backend turns them into pixels for its model. The hash keys the prompt cache,
so two different images never share KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageInput:
    data: bytes  # the image file as sent (PNG, JPEG or WebP), already checked to decode within the bounds
    mime: str  # "image/png", "image/jpeg" or "image/webp"
    width: int
    height: int
    sha256: str  # hex digest of ``data``
    # The decoded RGB image (a PIL image) when the serving layer already decoded it to check it: the
    # backend takes it instead of decoding the file a second time (a 1 MB PNG: ~20 ms each time).
    decoded: Any = field(default=None, compare=False, repr=False)
