"""Safe image fetching for `image_url` queries.

- Only http and https.
- The host is resolved first; every address must be public (`addresses.is_public`: not private, loopback,
  link-local, multicast, reserved or unspecified, and IPv6 forms that carry an IPv4 address are judged by
  that IPv4) unless the host or the address is allow-listed. The connection then goes to the checked
  address (the Host header and TLS SNI keep the name), so a second DNS answer cannot point the fetch
  somewhere else.
- Error answers say what was refused and why, never what a name resolves to, DNS or library messages:
  those are logged here. A host that does not resolve gets the same answer as one that resolves to a
  refused address, so that the API cannot be used to learn which internal names exist.
- Redirects are followed by hand, each hop checked the same way, at most `max_redirects`.
- The body is capped at `max_bytes` (checked on Content-Length and while streaming), the whole fetch at
  `timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable

import httpx

from clipsearch.errors import InputError
from clipsearch.serve.addresses import is_public, parse_ip

logger = logging.getLogger(__name__)


class ImageFetchError(InputError):
    """The image_url could not be fetched; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


REFUSED = "image_url: this host is not allowed (only hosts with public addresses are fetched)"


def _refused() -> ImageFetchError:
    return ImageFetchError(REFUSED, 403, hint="--allow-url-host HOST to allow it")


async def _resolve(host: str, port: int) -> list[str]:
    if parse_ip(host) is not None:
        return [host]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        logger.info("image_url host %r does not resolve: %s", host, e)
        raise _refused() from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def url_host(url: httpx.URL) -> str:
    """The host of `url` in its ASCII form (IDNA), lower case; ImageFetchError (400) when it is not valid."""
    try:
        url.host  # decodes IDNA: a malformed A-label (xn--...) raises here  # noqa: B018
        host = url.raw_host.decode("ascii").lower()
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        raise ImageFetchError("image_url has an invalid host name", 400) from None
    if not host:
        raise ImageFetchError("image_url has no host", 400)
    return host


def _allow_forms(allow_hosts: Iterable[str]) -> set[str]:
    out = set()
    for h in allow_hosts:
        h = h.lower()
        out.add(h)
        try:
            out.add(h.encode("idna").decode("ascii"))
        except UnicodeError:
            pass
    return out


async def check_url(url: httpx.URL, allow_hosts: Iterable[str]) -> str:
    """Return the address to connect to for `url`, or raise ImageFetchError (400 for a malformed URL,
    403 when refused)."""
    if url.scheme not in ("http", "https"):
        raise ImageFetchError("image_url must be an http or https URL", 400)
    host = url_host(url)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except (ValueError, TypeError):
        port = -1
    if not (0 < port < 65536):
        raise ImageFetchError("image_url has an invalid port", 400)
    allow = _allow_forms(allow_hosts)
    host_allowed = host in allow or f"{host}:{port}" in allow
    addrs = await _resolve(host, port)
    if not addrs:
        logger.info("image_url host %r resolves to no address", host)
        raise _refused()
    for a in addrs:
        ip = parse_ip(a)
        if ip is None or not (host_allowed or a in allow or is_public(ip)):
            logger.info("image_url refused: %r resolves to %s, which is not a public address", host, a)
            raise _refused()
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
    current = _parse_url(url)
    try:
        async with asyncio.timeout(timeout_s):
            async with httpx.AsyncClient(
                follow_redirects=False, timeout=timeout_s, transport=transport, trust_env=False
            ) as client:
                for _hop in range(max_redirects + 1):
                    addr = await check_url(current, allow)
                    try:
                        target = current.copy_with(host=addr)
                        netloc = current.netloc.decode("ascii")
                    except (httpx.InvalidURL, UnicodeError, ValueError):
                        raise ImageFetchError("image_url is not a valid URL", 400) from None
                    headers = {"Host": netloc, "User-Agent": "clipsearch-serve"}
                    extensions = {"sni_hostname": url_host(current)} if current.scheme == "https" else {}
                    req = client.build_request("GET", target, headers=headers, extensions=extensions)
                    try:
                        resp = await client.send(req, stream=True)
                    except (httpx.InvalidURL, UnicodeError, ValueError):
                        # httpx reads a redirect's Location as it receives the answer (idna.IDNAError)
                        raise ImageFetchError("image_url redirects to an invalid URL", 400) from None
                    try:
                        if resp.is_redirect:
                            loc = resp.headers.get("location")
                            if not loc:
                                raise ImageFetchError("image_url redirect has no Location", 422)
                            current = _parse_url(loc, base=current)
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
    except TimeoutError:
        raise ImageFetchError(f"image_url took longer than {timeout_s:g} s", 408) from None
    except httpx.HTTPError as e:
        logger.info("image_url %s could not be fetched: %s: %s", url[:200], type(e).__name__, e)
        raise ImageFetchError(f"image_url could not be fetched: {_fetch_failure(e)}", 422) from None


def _parse_url(text: str, base: httpx.URL | None = None) -> httpx.URL:
    """`text` as a URL (resolved against `base`, a redirect's Location); any parse error is a 400."""
    try:
        url = base.join(text) if base is not None else httpx.URL(text)
        if url.scheme in ("http", "https"):
            url_host(url)
    except ImageFetchError:
        raise
    except (httpx.InvalidURL, UnicodeError, ValueError, TypeError):
        where = "redirects to an invalid URL" if base is not None else "is not a valid URL"
        raise ImageFetchError(f"image_url {where}", 400) from None
    return url


def _fetch_failure(e: httpx.HTTPError) -> str:
    """What went wrong, in words (the library's class and message are logged, not returned)."""
    if isinstance(e, httpx.TimeoutException):
        return "the server did not answer in time"
    if isinstance(e, httpx.ConnectError):
        return "the connection failed"
    if isinstance(e, httpx.RemoteProtocolError | httpx.DecodingError):
        return "the server's answer was malformed"
    if isinstance(e, httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return "the connection was cut"
    return "the transfer failed"
