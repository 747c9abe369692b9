"""Fetching an http(s) image URL for a request (IMPETUS_ALLOW_IMAGE_URLS), without letting a client
reach what only the server can reach (SSRF).

A request's URL is the client's, so the server must not become its proxy into the server's own
network: the host name is resolved once, every address it resolves to must be public (no loopback,
private, link-local, multicast, reserved or unspecified address, IPv4-mapped and NAT64 forms
included), and the connection goes to that checked address, so a second lookup cannot answer
differently (DNS rebinding); TLS still verifies the certificate against the name. A redirect is
followed only through the same check, at most ``MAX_REDIRECTS`` times. Every fetch has one deadline
(IMPETUS_IMAGE_URL_TIMEOUT) for the lookup, the connection, the headers and the body together (a
watchdog shuts the socket at the deadline, so a server that drips a byte a second cannot hold the
thread), and one size limit (IMPETUS_MAX_IMAGE_BYTES, a 413), checked against Content-Length
before reading and against the bytes read. vLLM fetches image URLs too (with no address check);
llama-server and Ollama take none, and we take none unless the operator turns it on.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urljoin, urlsplit

from gerdsen_ai_server.errors import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # IPv4 addresses reached through a NAT64 gateway
CHUNK = 64 << 10
# Name lookups have no timeout of their own: they run here, and a fetch waits for one only until its deadline.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-dns")


def is_public(address: IPAddress) -> bool:
    """Whether a fetch may connect to ``address``: a globally routable unicast address, with an IPv4
    address inside an IPv6 one (``::ffff:127.0.0.1``, 6to4, NAT64) judged as that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(inner)
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _refused(where: str, why: str, status: int = 400, code: str = "invalid_image_url") -> APIError:
    return APIError(status, f"{where}: {why}", param=where, code=code)


def resolve(host: str, port: int, where: str, deadline: float, allow: Callable[[IPAddress], bool]) -> str:
    """The address to connect to: ``host``'s first, once every address it resolves to is allowed."""
    lookup = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=max(deadline - time.monotonic(), 0.001))
    except FutureTimeout:
        raise _refused(where, f"the image URL's host '{host[:100]}' did not resolve in time") from None
    except OSError:
        raise _refused(where, f"the image URL's host '{host[:100]}' does not resolve") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses or not all(allow(a) for a in addresses):
        raise _refused(
            where,
            f"the image URL's host '{host[:100]}' is not a public address (loopback, private, link-local "
            "and reserved addresses are never fetched)",
        )
    return str(addresses[0])


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to a checked address, whatever its name resolves to by now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.watched: socket.socket | None = None  # what the deadline shuts (http.client drops ``sock`` early)

    def connect(self) -> None:
        self.sock = self.watched = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTLS(_Pinned):
    """HTTPS to a checked address; the certificate is verified against the URL's host name."""

    default_port = 443

    def connect(self) -> None:
        super().connect()
        self.sock = self.watched = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


def fetch(
    url: str, where: str, max_bytes: int, timeout: float, allow: Callable[[IPAddress], bool] = is_public
) -> bytes:
    """The body of ``url`` (a 200 answer), within the deadline and the size limit. ``allow`` is the
    address check: the tests pass their own to reach a server on loopback."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _refused(where, "an image URL must be http(s) with a host (or a data: URL)")
        if parts.username is not None or parts.password is not None:
            raise _refused(where, "an image URL may not carry credentials")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise _refused(where, "the image URL's port is not valid") from None
        address = resolve(parts.hostname, port, where, deadline, allow)
        kind = _PinnedTLS if parts.scheme == "https" else _Pinned
        conn = kind(parts.hostname, port, address, max(deadline - time.monotonic(), 0.001))
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shut, (conn,))
        watchdog.start()
        late = _refused(where, f"the image URL did not answer within {timeout:g} s (IMPETUS_IMAGE_URL_TIMEOUT)")
        try:
            status, location, body = _get(conn, parts.path or "/", parts.query, where, max_bytes)
        except APIError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise late from None
            raise _refused(where, f"the image URL could not be fetched ({type(exc).__name__})") from None
        finally:
            watchdog.cancel()
            conn.close()
        if time.monotonic() >= deadline:  # the watchdog ended a body that had no length of its own
            raise late
        if status in REDIRECTS and location:
            url = urljoin(url, location)  # checked like the first: scheme, host, address
            continue
        if status != 200:
            raise _refused(where, f"the image URL answered HTTP {status}")
        return body
    raise _refused(where, f"the image URL redirected more than {MAX_REDIRECTS} times")


def _shut(conn: _Pinned) -> None:
    """The deadline: a blocked read returns at once (shutdown wakes it; close alone may not)."""
    try:
        if conn.watched is not None:  # the plain socket's shutdown, also under TLS (no close_notify from here)
            socket.socket.shutdown(conn.watched, socket.SHUT_RDWR)
    except OSError:
        pass


def _get(conn: _Pinned, path: str, query: str, where: str, max_bytes: int) -> tuple[int, str | None, bytes]:
    conn.request(
        "GET",
        path + (f"?{query}" if query else ""),
        headers={"Accept": "image/png, image/jpeg, image/webp", "User-Agent": "impetus-image-fetch"},
    )
    response = conn.getresponse()
    if response.status != 200:
        return response.status, response.getheader("Location"), b""
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _too_large(where, max_bytes)
    body = bytearray()
    while chunk := response.read1(CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(where, max_bytes)
    if not response.isclosed() and response.length:  # the body ended before its Content-Length
        raise http.client.IncompleteRead(bytes(body), response.length)
    return 200, None, bytes(body)


def _too_large(where: str, max_bytes: int) -> APIError:
    return _refused(
        where, f"the image is larger than {max_bytes} bytes (IMPETUS_MAX_IMAGE_BYTES)", 413, "image_too_large"
    )
