"""A local HTTP server with well-behaved and hostile routes, shared by the download tests."""

from __future__ import annotations

import functools
import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from dl_assets import ASSETS


@functools.cache
def _gzip_bomb() -> bytes:
    return gzip.compress(b"\x00" * (16 << 20), compresslevel=6)


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}
        self.user_agents: list[str] = []
        self.stop = threading.Event()
        self.gate = threading.Event()  # /gated answers once a test sets it
        self.in_flight = self.max_in_flight = 0

    def hit(self, key: str) -> int:
        with self.lock:
            self.hits[key] = self.hits.get(key, 0) + 1
            return self.hits[key]


def make_handler(state: _State):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers=None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers or []:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: C901 - a router
            state.user_agents.append(self.headers.get("User-Agent", ""))
            url = urlsplit(self.path)
            path, q = url.path, url.query
            parts = path.strip("/").split("/")
            try:
                if parts[0] == "img":
                    ctype, body = ASSETS[parts[1]]
                    return self._send(200, body, ctype)
                if parts[0] == "counted":  # an asset, counting the requests per path+query
                    state.hit(path + "?" + q)
                    ctype, body = ASSETS[parts[1]]
                    return self._send(200, body, ctype)
                if parts[0] == "404":
                    return self._send(404, b"nope", "text/plain")
                if parts[0] == "err500":  # 500 on the first hit of each id, then the image
                    if state.hit(path + q) == 1:
                        return self._send(500, b"oops", "text/plain")
                    return self._send(200, ASSETS["big.jpg"][1])
                if parts[0] == "flaky":  # 503 on the first hit: for --retry-failed
                    if state.hit(path + q) == 1:
                        return self._send(503, b"busy", "text/plain")
                    return self._send(200, ASSETS["other.jpg"][1])
                if parts[0] == "always500":
                    state.hit(path + q)
                    return self._send(500, b"oops", "text/plain")
                if parts[0] == "r429":  # 429 + Retry-After: 1 on the first hit
                    if state.hit(path + q) == 1:
                        return self._send(429, b"slow down", "text/plain", [("Retry-After", "1")])
                    return self._send(200, ASSETS["tall.jpg"][1])
                if parts[0] == "slow":  # announces an image, then drips one byte every 0.2 s
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    body = ASSETS["big.jpg"][1]
                    for i in range(150):
                        if state.stop.is_set():
                            return
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                if parts[0] == "endless":  # a chunked body that never ends (bounded at 200 MB)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    block = b"\xff" * 65536
                    for _ in range(3200):
                        if state.stop.is_set():
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    return
                if parts[0] == "gzipbomb":  # small on the wire, 16 MB once decompressed
                    body = _gzip_bomb()
                    return self._send(200, body, "image/jpeg", [("Content-Encoding", "gzip")])
                if parts[0] == "html":
                    return self._send(200, b"<html><body>hello</body></html>", "text/html; charset=utf-8")
                if parts[0] == "octet":
                    return self._send(200, ASSETS["big.jpg"][1], "application/octet-stream")
                if parts[0] == "redirect":
                    return self._send(302, b"", "text/plain", [("Location", "/img/other.jpg")])
                if parts[0] == "loop":
                    return self._send(302, b"", "text/plain", [("Location", "/loop")])
                if parts[0] == "robots":
                    tag = {
                        "noai": "noai",
                        "noindex": "noindex, nofollow",
                        "otherbot": "otherbot: noai",
                        "ours": "clipsearch: noimageai",
                        "mybot": "mybot: noai",
                        "none": "nofollow",
                    }[parts[1]]
                    return self._send(200, ASSETS["big.jpg"][1], "image/jpeg", [("X-Robots-Tag", tag)])
                if parts[0] == "conc":  # records how many requests are in flight at once
                    with state.lock:
                        state.in_flight += 1
                        state.max_in_flight = max(state.max_in_flight, state.in_flight)
                    time.sleep(0.1)
                    with state.lock:
                        state.in_flight -= 1
                    return self._send(200, ASSETS["small.jpg"][1])
                if (
                    parts[0] == "gated"
                ):  # an image once the test opens the gate (the kill test), 120 s at most
                    state.gate.wait(120)
                    return self._send(200, ASSETS["small.jpg"][1])
                if parts[0] == "delay":  # an image after 0.2 s
                    time.sleep(0.2)
                    return self._send(200, ASSETS["small.jpg"][1])
                return self._send(404, b"unknown route", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                return

    return H


class Server:
    def __init__(self) -> None:
        self.state = _State()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="session")
def server():
    s = Server()
    _gzip_bomb()  # built once, before any request times it
    s.thread.start()
    yield s
    s.state.stop.set()
    s.httpd.shutdown()
    s.httpd.server_close()
