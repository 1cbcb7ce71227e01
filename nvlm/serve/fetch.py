"""Remote image fetching for ``--allow-remote-images``, built against server-side request forgery.

Guarantees of :func:`fetch`:
- Only public addresses are contacted (unless ``allowed`` says otherwise): the host is resolved once, every
  address it resolves to must pass (no loopback, private, link-local, multicast, reserved, unspecified or
  shared addresses, also when written as a decimal integer, in hex, or embedded in IPv6 as mapped, 6to4 or
  Teredo), and the connection goes to an address that was checked (no second lookup to rebind).
- Redirects (at most ``MAX_REDIRECTS``) are followed by hand, each hop checked like the first URL.
- One overall deadline covers every lookup, connection, redirect and read; the body is read in chunks and
  refused as soon as it passes ``max_bytes`` (a ``Content-Length`` over it is refused before reading).
- Every failure raises :class:`FetchError` with the one text ``FETCH_FAILED``: the client cannot tell a
  refused address from a closed port, a timeout or a 404 (the reason is kept as ``__cause__`` for logs).
The server runs fetches on a thread pool of their own, so slow hosts never hold the pool that prepares
other requests.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

FETCH_FAILED = "could not fetch the image URL"
MAX_REDIRECTS = 3
CHUNK = 64 * 1024
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class FetchError(OSError):
    """A remote image could not be fetched; the message is always ``FETCH_FAILED``."""

    def __init__(self) -> None:
        super().__init__(FETCH_FAILED)


class _Refused(Exception):
    """The internal reason behind a FetchError."""


def is_public(ip: Address) -> bool:
    """A globally routable unicast address, looking inside IPv6 forms that carry an IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None and not is_public(inner):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (what the socket layer would connect to)."""
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def fetch(
    url: str,
    max_bytes: int,
    timeout_s: float,
    *,
    resolver: Resolver = resolve,
    allowed: Callable[[Address], bool] = is_public,
) -> bytes:
    """The body of an http(s) URL, under the guarantees in the module docstring."""
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = _get(url, max_bytes, deadline, resolver, allowed)
            if location is None:
                if status != 200:
                    raise _Refused(f"HTTP status {status}")
                return body
            url = urljoin(url, location)
        raise _Refused("too many redirects")
    except (_Refused, OSError, http.client.HTTPException, ValueError, UnicodeError) as e:
        raise FetchError() from e


def _get(
    url: str, max_bytes: int, deadline: float, resolver: Resolver, allowed: Callable[[Address], bool]
) -> tuple[int, str | None, bytes]:
    """One GET: (status, redirect location or None, body)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Refused(f"not an http(s) URL with a host: {url[:80]!r}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolver(host, port)]
    if not addresses or not all(allowed(a) for a in addresses):
        raise _Refused(f"{host} resolves to a non-public address ({', '.join(map(str, addresses))})")
    sock = socket.create_connection((str(addresses[0]), port), timeout=_left(deadline))
    if parts.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    conn = http.client.HTTPConnection(host, port, timeout=_left(deadline))
    conn.sock = sock  # pinned to the checked address: no second lookup
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Host": parts.netloc.rpartition("@")[2], "User-Agent": "nvlm-serve", "Accept": "image/*"}
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        if r.status in (301, 302, 303, 307, 308) and r.getheader("location"):
            return r.status, r.getheader("location"), b""
        size = r.getheader("content-length")
        if size is not None and size.isdigit() and int(size) > max_bytes:
            raise _Refused(f"Content-Length {size} is over {max_bytes} bytes")
        chunks: list[bytes] = []
        total = 0
        while True:
            sock.settimeout(_left(deadline))
            chunk = r.read1(CHUNK) if r.status == 200 else b""
            if not chunk:
                return r.status, None, b"".join(chunks)
            total += len(chunk)
            if total > max_bytes:
                raise _Refused(f"body over {max_bytes} bytes")
            chunks.append(chunk)
    finally:
        conn.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Refused("deadline passed")
    return left
