"""The HTTP client: asyncio + aiohttp, one session per shard.

Per request: one total deadline (connect, redirects, headers and body together), a cap on the body size,
redirects followed, X-Robots-Tag opt-outs honoured before the body is read. Retries with exponential
backoff only for timeouts, 5xx and 429 (honouring Retry-After). Concurrency is capped overall and per
host, and DNS answers are cached.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import random
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from clipsearch.download.config import DownloadConfig

logger = logging.getLogger(__name__)

#: a Retry-After longer than this is not waited for: the sample fails
MAX_RETRY_AFTER_S = 60.0
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 30.0
_NOT_IMAGE_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/xhtml",
    "application/javascript",
)
#: X-Robots-Tag rules that take a value after a colon, so "name: value" is not a user-agent scope
_VALUED_RULES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


@dataclass
class Fetched:
    """What a fetch gives: the body, or why there is none."""

    status: str  # "ok", "failed_to_download" or "opted_out"
    data: bytes | None = None
    error: str | None = None
    attempts: int = 1


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Failed(Exception):
    pass


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - (time.time() if now is None else now))


def robots_opt_out(
    values: list[str], agent_tokens: frozenset[str], directives: tuple[str, ...]
) -> str | None:
    """The X-Robots-Tag directive that forbids our use, or None.

    Handles unscoped rules ("noai, noimageai") and rules scoped to a user agent ("otherbot: noai"),
    which bind us only when the agent is one of ours.
    """
    if not directives:
        return None
    wanted = set(directives)
    for header in values:
        scope: str | None = None
        for part in header.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if ":" in part:
                head, _, rest = part.partition(":")
                head = head.strip()
                if head not in _VALUED_RULES:
                    scope, part = head, rest.strip()
            if scope is not None and scope not in agent_tokens:
                continue
            if part in wanted:
                return part if scope is None else f"{scope}: {part}"
    return None


class Fetcher:
    """Use as `async with Fetcher(cfg) as f: await f.fetch(url)`."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.thread_count,
            limit_per_host=0,  # capped by _host_slot, outside the request deadline
            use_dns_cache=True,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": self.cfg.user_agent, "Accept": "image/*,*/*;q=0.8"},
            timeout=aiohttp.ClientTimeout(total=None),  # our own deadline covers the whole request
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,
        )
        return self

    def _host_slot(self, url: str) -> asyncio.Semaphore:
        host = urlsplit(url).netloc.lower()
        sem = self._hosts.get(host)
        if sem is None:
            sem = self._hosts[host] = asyncio.Semaphore(self.cfg.max_connections_per_host)
        return sem

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str | None) -> Fetched:
        if not url:
            return Fetched("failed_to_download", error="empty URL")
        if not url.startswith(("http://", "https://")):
            return Fetched("failed_to_download", error="unsupported URL scheme")
        attempt = 0
        while True:
            try:
                # the per-host slot is taken before the deadline starts: queueing is not the server's fault
                async with self._host_slot(url), asyncio.timeout(self.cfg.timeout):
                    return await self._once(url, attempt + 1)
            except TimeoutError:
                err = _Retryable(f"timeout after {self.cfg.timeout:g}s")
            except _Retryable as e:
                err = e
            except _Failed as e:
                return Fetched("failed_to_download", error=str(e), attempts=attempt + 1)
            except aiohttp.TooManyRedirects:
                return Fetched("failed_to_download", error="too many redirects", attempts=attempt + 1)
            except aiohttp.InvalidURL:
                return Fetched("failed_to_download", error="invalid URL", attempts=attempt + 1)
            except aiohttp.ClientConnectorError as e:
                return Fetched(
                    "failed_to_download", error=f"connection failed: {_oserror(e)}", attempts=attempt + 1
                )
            except aiohttp.ClientPayloadError:
                return Fetched("failed_to_download", error="incomplete or corrupt body", attempts=attempt + 1)
            except aiohttp.ServerDisconnectedError:
                return Fetched("failed_to_download", error="server disconnected", attempts=attempt + 1)
            except (aiohttp.ClientError, OSError, ValueError, UnicodeError) as e:
                return Fetched("failed_to_download", error=f"{type(e).__name__}", attempts=attempt + 1)
            if attempt >= self.cfg.retries:
                return Fetched("failed_to_download", error=str(err), attempts=attempt + 1)
            if err.retry_after is not None:
                if err.retry_after > MAX_RETRY_AFTER_S:
                    return Fetched(
                        "failed_to_download", error=f"{err} (Retry-After too long)", attempts=attempt + 1
                    )
                delay = err.retry_after
            else:
                delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.5)
            attempt += 1
            await asyncio.sleep(delay)

    async def _once(self, url: str, attempt: int) -> Fetched:
        assert self._session is not None
        cfg = self.cfg
        async with self._session.get(url, allow_redirects=True, max_redirects=10) as resp:
            st = resp.status
            if st == 429:
                raise _Retryable("HTTP 429", parse_retry_after(resp.headers.get("Retry-After")))
            if st >= 500:
                raise _Retryable(f"HTTP {st}")
            if st != 200 and not (200 < st < 300 and st != 204):
                raise _Failed(f"HTTP {st}")
            why = robots_opt_out(
                resp.headers.getall("X-Robots-Tag", []), cfg.agent_tokens, cfg.disallowed_header_directives
            )
            if why is not None:
                return Fetched("opted_out", error=f"X-Robots-Tag {why}", attempts=attempt)
            ctype = resp.headers.get("Content-Type", "").lower()
            if ctype.startswith(_NOT_IMAGE_TYPES):
                raise _Failed(f"not an image: Content-Type {ctype.split(';')[0]}")
            length = resp.content_length
            if length is not None and length > cfg.max_bytes and not resp.headers.get("Content-Encoding"):
                raise _Failed(f"larger than max_bytes ({cfg.max_bytes})")
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = await resp.content.read(1 << 17)
                if not chunk:
                    break
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise _Failed(f"larger than max_bytes ({cfg.max_bytes})")
                chunks.append(chunk)
            if not size:
                raise _Failed("empty body")
            return Fetched("ok", data=chunks[0] if len(chunks) == 1 else b"".join(chunks), attempts=attempt)


def _oserror(e: aiohttp.ClientConnectorError) -> str:
    """A stable reason (no host names), so that top errors group well."""
    os_err = getattr(e, "os_error", None)
    code = getattr(os_err, "errno", None)
    if code in errno.errorcode:
        return errno.errorcode[code]
    if isinstance(os_err, socket.gaierror):
        return "DNS lookup failed"
    return type(os_err).__name__ if os_err else type(e).__name__
