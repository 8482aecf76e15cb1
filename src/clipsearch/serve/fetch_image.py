"""Safe image fetching for `image_url` queries, and image decoding with size limits.

- Only http and https.
- The host is resolved first; every address must be public (not private, loopback, link-local, multicast,
  reserved or unspecified) unless the host or the address is allow-listed. The connection then goes to
  the checked address (the Host header and TLS SNI keep the name), so a second DNS answer cannot point
  the fetch somewhere else.
- Redirects are followed by hand, each hop checked the same way, at most `max_redirects`.
- The body is capped at `max_bytes` (checked on Content-Length and while streaming), the whole fetch at
  `timeout_s`.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import socket
import warnings
from collections.abc import Iterable

import httpx
from PIL import Image

from clipsearch.errors import InputError

logger = logging.getLogger(__name__)


class ImageFetchError(InputError):
    """The image_url could not be fetched; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast and not ip.is_unspecified


async def _resolve(host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ImageFetchError(f"image_url host {host!r} does not resolve: {e}", 422) from e
    return list(dict.fromkeys(info[4][0] for info in infos))


async def check_url(url: httpx.URL, allow_hosts: Iterable[str]) -> str:
    """Return the address to connect to for `url`, or raise ImageFetchError (403 when refused)."""
    if url.scheme not in ("http", "https"):
        raise ImageFetchError(f"image_url must be http or https, got {url.scheme or 'no'} scheme", 400)
    host = (url.host or "").lower()
    if not host:
        raise ImageFetchError("image_url has no host", 400)
    allow = {h.lower() for h in allow_hosts}
    port = url.port or (443 if url.scheme == "https" else 80)
    addrs = await _resolve(host, port)
    if not addrs:
        raise ImageFetchError(f"image_url host {host!r} does not resolve", 422)
    host_allowed = host in allow or f"{host}:{port}" in allow
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
        if not (host_allowed or a in allow or _is_public(ip)):
            raise ImageFetchError(
                f"image_url host {host!r} resolves to {a}, a private, loopback or link-local address: refused",
                403,
                hint="--allow-url-host HOST to allow it",
            )
    return addrs[0]


async def fetch_image_bytes(
    url: str,
    *,
    allow_hosts: Iterable[str] = (),
    timeout_s: float = 5.0,
    max_bytes: int = 10 * 1024 * 1024,
    max_redirects: int = 3,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """Fetch an image URL under the rules above."""
    allow = tuple(allow_hosts)
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise ImageFetchError(f"image_url is not a valid URL: {e}", 400) from e
    try:
        async with asyncio.timeout(timeout_s):
            async with httpx.AsyncClient(
                follow_redirects=False, timeout=timeout_s, transport=transport, trust_env=False
            ) as client:
                for _hop in range(max_redirects + 1):
                    addr = await check_url(current, allow)
                    target = current.copy_with(host=addr)
                    headers = {"Host": current.netloc.decode("ascii"), "User-Agent": "clipsearch-serve"}
                    extensions = {"sni_hostname": current.host} if current.scheme == "https" else {}
                    req = client.build_request("GET", target, headers=headers, extensions=extensions)
                    resp = await client.send(req, stream=True)
                    try:
                        if resp.is_redirect:
                            loc = resp.headers.get("location")
                            if not loc:
                                raise ImageFetchError("image_url redirect has no Location", 422)
                            current = current.join(loc)
                            continue
                        if resp.status_code != 200:
                            raise ImageFetchError(f"image_url answered HTTP {resp.status_code}", 422)
                        length = resp.headers.get("content-length")
                        if length and length.isdigit() and int(length) > max_bytes:
                            raise ImageFetchError(
                                f"image_url body is {length} bytes, over the {max_bytes} limit", 413
                            )
                        buf = bytearray()
                        async for chunk in resp.aiter_bytes():
                            buf += chunk
                            if len(buf) > max_bytes:
                                raise ImageFetchError(
                                    f"image_url body is over the {max_bytes} bytes limit", 413
                                )
                        return bytes(buf)
                    finally:
                        await resp.aclose()
                raise ImageFetchError(f"image_url redirected more than {max_redirects} times", 422)
    except TimeoutError as e:
        raise ImageFetchError(f"image_url took longer than {timeout_s}s", 408) from e
    except httpx.HTTPError as e:
        raise ImageFetchError(f"image_url could not be fetched: {type(e).__name__}: {e}", 422) from e


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode image bytes into an RGB PIL image; InputError when unreadable or too large."""
    if not data:
        raise InputError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"the image is {w}x{h}, over the {max_pixels} pixels limit")
            img.load()
            return img.convert("RGB")
    except InputError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise InputError(f"the image could not be decoded: {type(e).__name__}") from e
    except Exception as e:  # PIL raises many types on corrupt data
        raise InputError(f"the image could not be decoded: {type(e).__name__}") from e
