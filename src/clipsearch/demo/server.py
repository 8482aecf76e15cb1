"""A small static HTTP server on 127.0.0.1, so the demo and the tests fetch images over real HTTP."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


@contextmanager
def serve_directory(directory: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `directory` over HTTP in a background thread; yields the base URL (no trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _Server((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="clipsearch-static", daemon=True)
    thread.start()
    base = f"http://{host}:{server.server_address[1]}"
    logger.debug("serving %s at %s", directory, base)
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
