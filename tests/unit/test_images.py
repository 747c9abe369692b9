"""Images in requests (serving/images.py, serving/image_fetch.py): decoding, bounds, bombs, schemes,
and the address policy of URL fetches. No network: the fetches go to HTTP servers these tests run on
loopback, which the default policy refuses (the server sees no request); the fetch path itself is
shown through the tests' own address check, the one parameter a request cannot set."""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.anthropic import MessagesRequest
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest
from gerdsen_ai_server.schemas.responses import ResponsesRequest
from gerdsen_ai_server.serving import anthropic as anthropic_serving
from gerdsen_ai_server.serving import responses as responses_serving
from gerdsen_ai_server.serving.image_fetch import _Pinned, fetch, is_public
from gerdsen_ai_server.serving.images import (
    ImageLimits,
    check_images,
    decode_image,
    image_parts,
    load_images,
    template_content,
)

LIMITS = ImageLimits()
URLS = ImageLimits(allow_urls=True, url_timeout=2.0)


def allow_all(_: Any) -> bool:
    return True


def encoded(fmt: str, size: tuple[int, int] = (16, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 0).save(buf, fmt)
    return buf.getvalue()


PNG, JPEG, WEBP = encoded("PNG"), encoded("JPEG"), encoded("WEBP")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(*urls: str, text: str = "What is this?") -> ChatCompletionRequest:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": parts}]})


def refused(call: Callable[[], Any], status: int = 400) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.status == status, info.value.message
    return info.value


def png_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG file by hand: any dimensions the header claims, over any compressed data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "mime"), [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp")])
def test_png_jpeg_and_webp_data_urls_decode_in_order(data: bytes, mime: str) -> None:
    images = load_images(chat(data_url(data, mime), data_url(PNG)), LIMITS)
    assert [(i.mime, i.width, i.height) for i in images] == [(mime, 16, 8), ("image/png", 16, 8)]
    assert images[0].data == data and images[0].sha256 == hashlib.sha256(data).hexdigest()


def test_the_declared_type_must_match_the_bytes() -> None:
    error = refused(lambda: load_images(chat(data_url(PNG, "image/jpeg")), LIMITS))
    assert error.param == "messages.0.content.1" and "declared image/jpeg but its bytes are image/png" in error.message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (data_url(PNG, "image/gif"), "'image/gif' are not supported"),
        (data_url(PNG, "image/svg+xml"), "not supported"),
        ("data:image/png," + PNG.decode("latin-1"), "must be base64"),
        ("data:image/png;base64,@@not*base64@@", "base64 is not valid"),
        (data_url(b"GIF89a" + bytes(40)), "not a PNG, JPEG or WebP"),
        (data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "not a PNG, JPEG or WebP"),
        ("data:image/png;base64", "not a valid data: URL"),
    ],
)
def test_wrong_types_and_bad_encodings_are_400(url: str, why: str) -> None:
    error = refused(lambda: load_images(chat(url), LIMITS))
    assert why in error.message and error.param == "messages.0.content.1", error.message


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_a_truncated_image_is_400_not_an_engine_error(fmt: str, mime: str) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, fmt)  # noise: the pixel data is most of the file
    data = buf.getvalue()
    error = refused(lambda: load_images(chat(data_url(data[: len(data) * 2 // 3], mime)), LIMITS))
    assert "could not be decoded" in error.message and "0x" not in error.message, error.message


def test_a_corrupt_image_is_400() -> None:
    big = encoded("PNG", (64, 64))
    body = bytearray(big)
    start = big.index(b"IDAT") + 8
    body[start : start + 20] = bytes(20)  # the compressed stream damaged
    error = refused(lambda: decode_image(bytes(body), "image/png", "messages.0.content.0", LIMITS))
    assert "could not be decoded" in error.message


def test_a_decompression_bomb_is_refused_before_it_is_decompressed() -> None:
    side = 6000  # 36 Mpx of zeros: about 35 KB of PNG, 36 MB once decoded
    bomb = png_header(side, side, zlib.compress(bytes(side + 1) * side, 9))
    assert len(bomb) < 100_000
    started = time.monotonic()
    error = refused(lambda: load_images(chat(data_url(bomb)), LIMITS))
    assert "6000x6000 pixels" in error.message and "IMPETUS_MAX_IMAGE_PIXELS" in error.message
    assert time.monotonic() - started < 0.5  # the header was read, not the pixels
    # Past our own bound, Pillow's (twice its MAX_IMAGE_PIXELS) still refuses it without decoding.
    huge = png_header(100_000, 100_000, zlib.compress(b""))
    error = refused(lambda: decode_image(huge, "image/png", "p", ImageLimits(max_pixels=10**12)))
    assert "decompression bomb" in error.message


def test_pixels_bytes_and_count_are_bounded() -> None:
    small = ImageLimits(max_images=2, max_bytes=len(PNG) - 1, max_pixels=100)
    error = refused(lambda: load_images(chat(data_url(PNG)), small), 413)
    assert error.code == "image_too_large" and "IMPETUS_MAX_IMAGE_BYTES" in error.message
    error = refused(lambda: load_images(chat(data_url(PNG)), ImageLimits(max_pixels=100)))
    assert "16x8 pixels, over the 100 allowed" in error.message
    error = refused(lambda: check_images(chat(*[data_url(PNG)] * 3), small))
    assert error.param == "messages.0.content.3" and "at most 2 images" in error.message
    # A data: URL far over the bound is refused from its length, before it is decoded.
    error = refused(lambda: check_images(chat(data_url(bytes(4096))), ImageLimits(max_bytes=1024)), 413)
    assert error.param == "messages.0.content.1"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://127.0.0.1:6379/_INFO",
        "javascript:alert(1)",
        "/etc/passwd",
        "a.png",
    ],
)
def test_schemes_other_than_data_and_http_are_refused(url: str) -> None:
    error = refused(lambda: check_images(chat(url), URLS))
    assert error.code == "invalid_image_url" and "data: URL" in error.message


def test_http_urls_are_refused_unless_the_operator_allows_them() -> None:
    error = refused(lambda: check_images(chat("https://example.com/a.png"), LIMITS))
    assert "IMPETUS_ALLOW_IMAGE_URLS is off" in error.message
    check_images(chat("https://example.com/a.png"), URLS)  # allowed: fetched later, under the address check


def test_images_outside_user_messages_are_refused_by_the_schema() -> None:
    with pytest.raises(APIError) as info:
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            }
        )
    assert info.value.param == "messages.0.content.0" and "only allowed in user messages" in info.value.message


@pytest.mark.parametrize(
    ("part", "param", "code"),
    [
        (
            {"type": "image_url", "image_url": {"uri": "x"}},
            "messages.0.content.1.image_url.url",
            "missing_required_parameter",
        ),
        (
            {"type": "image_url", "image_url": {"url": "x", "detail": "max"}},
            "messages.0.content.1.image_url.detail",
            "invalid_value",
        ),
        (
            {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
            "messages.0.content.1.image_url",
            "invalid_value",
        ),
        ({"type": "image_url", "image_url": {"url": "x"}, "alt": "a"}, "messages.0.content.1.alt", "unknown_parameter"),
    ],
)
def test_a_malformed_image_part_is_named_inside_it(part: dict[str, Any], param: str, code: str) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "hi"}, part]}
    with pytest.raises(APIError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [message]})
    assert (info.value.param, info.value.code) == (param, code) and ".str" not in info.value.message


def test_each_image_becomes_a_template_placeholder_in_its_place() -> None:
    request = chat(data_url(PNG), data_url(JPEG), text="Compare:")
    assert template_content(request.messages[0]) == [
        {"type": "text", "text": "Compare:"},
        {"type": "image"},
        {"type": "image"},
    ]
    assert request.messages[0].text() == "Compare:"  # what a text-only path reads: no image bytes in it


# ---- the other APIs' images, converted, with their own places ------------------------------------


def test_anthropic_image_blocks_become_image_parts_named_where_they_were_sent() -> None:
    body = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 5,
            "system": "Be brief.",  # the chat request's message 0: the image's place is still messages.0
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
                    ],
                }
            ],
        }
    )
    request = anthropic_serving.to_openai(body)
    assert [(w, p.image_url.url) for w, p in image_parts(request)] == [
        ("messages.0.content.1", "data:image/jpeg;base64,AAAA")
    ]
    error = refused(lambda: load_images(request, LIMITS))
    assert error.param == "messages.0.content.1"


def test_responses_input_image_becomes_an_image_part_named_where_it_was_sent() -> None:
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Hello"},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": data_url(PNG), "detail": "low"},
                    ],
                },
            ],
        }
    )
    request = responses_serving.to_openai(body)
    assert [w for w, _ in image_parts(request)] == ["input.1.content.1"]
    assert load_images(request, LIMITS)[0].width == 16
    for part, why in (({"file_id": "file-1"}, "Files API"), ({"image_url": data_url(PNG)}, "only allowed in user")):
        role = "assistant" if "image_url" in part else "user"
        bad = {"model": "m", "input": [{"role": role, "content": [{"type": "input_image", **part}]}]}
        error = refused(lambda bad=bad: responses_serving.to_openai(ResponsesRequest.model_validate(bad)))
        assert error.param == "input.0.content.0" and why in error.message


# ---- URL fetches: the address policy -------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_never_fetched(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_fetched(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


class Site:
    """An HTTP server on loopback whose answers the test sets; it counts the requests it gets."""

    def __init__(self) -> None:
        self.hits = 0
        self.answer: Callable[[BaseHTTPRequestHandler], None] = lambda h: self.send(h, PNG)
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                site.hits += 1
                site.answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @staticmethod
    def send(h: BaseHTTPRequestHandler, body: bytes, status: int = 200, **headers: str) -> None:
        h.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.server.shutdown()
    s.server.server_close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "[::1]"])
def test_loopback_is_refused_by_the_default_policy_without_a_request(site: Site, host: str) -> None:
    error = refused(lambda: load_images(chat(f"http://{host}:{site.port}/a.png"), URLS))
    assert error.code == "invalid_image_url" and "not a public address" in error.message, error.message
    assert site.hits == 0


def test_the_fetch_path_works_through_an_allowed_address(site: Site) -> None:
    images = load_images(chat(f"{site.url}/a.png?x=1"), URLS, allow=allow_all)
    assert images[0].data == PNG and site.hits == 1


def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(site: Site) -> None:
    # A name that resolves nowhere: had the connection looked it up again, it would fail.
    conn = _Pinned("rebound.invalid", site.port, "127.0.0.1", 2.0)
    conn.request("GET", "/")
    assert conn.getresponse().read() == PNG
    conn.close()


def test_a_redirect_is_checked_like_the_first_url(site: Site) -> None:
    only_first = {ipaddress.ip_address("127.0.0.1")}
    site.answer = lambda h: site.send(h, b"", 302, Location=f"http://127.0.0.2:{site.port}/b.png")
    error = refused(lambda: fetch(f"{site.url}/a.png", "p", 1 << 20, 2.0, lambda a: a in only_first))
    assert "'127.0.0.2' is not a public address" in error.message and site.hits == 1
    site.answer = lambda h: site.send(h, b"", 302, Location="file:///etc/passwd")
    assert "must be http(s)" in refused(lambda: fetch(site.url, "p", 1 << 20, 2.0, allow_all)).message
    site.answer = lambda h: site.send(h, b"", 302, Location="/again")
    assert "redirected more than" in refused(lambda: fetch(site.url, "p", 1 << 20, 2.0, allow_all)).message
    site.answer = lambda h: site.send(h, b"", 302, Location="/c.png") if h.path == "/" else site.send(h, PNG)
    assert fetch(site.url, "p", 1 << 20, 2.0, allow_all) == PNG


def test_an_oversized_answer_is_413_declared_or_not(site: Site) -> None:
    site.answer = lambda h: site.send(h, bytes(5000))
    assert refused(lambda: fetch(site.url, "p", 4096, 2.0, allow_all), 413).code == "image_too_large"

    def undeclared(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: the body ends with the connection
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(bytes(100_000))

    site.answer = undeclared
    refused(lambda: fetch(site.url, "p", 4096, 2.0, allow_all), 413)


def test_a_slow_url_ends_at_the_deadline(site: Site) -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:  # a byte every 0.1 s: each read alone is quick
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    for answer in (drip, lambda h: time.sleep(3)):  # a drip, then no answer at all
        site.answer = answer
        started = time.monotonic()
        error = refused(lambda: fetch(site.url, "p", 1 << 20, 0.5, allow_all))
        assert "did not answer within 0.5 s" in error.message and time.monotonic() - started < 1.5


def test_an_error_status_is_400(site: Site) -> None:
    site.answer = lambda h: site.send(h, b"gone", 404)
    assert "answered HTTP 404" in refused(lambda: fetch(site.url, "p", 1 << 20, 2.0, allow_all)).message
