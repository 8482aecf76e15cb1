"""Shared fixtures: a local image server, small index folders, the app with a fake encoder, a live server."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import faiss
import pytest
from PIL import Image

from .helpers import RGB, FakeEncoder, build_index, captions

N = 2000

# one OpenMP thread: on a shared 2-core machine, OpenMP spin-waiting makes small builds 10-20x slower
faiss.omp_set_num_threads(1)


def png_bytes(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (size, size), color)
    # a lighter inner square so the thumbnails look like pictures, not flat swatches
    inner = Image.new("RGB", (size // 2, size // 2), tuple(min(255, c + 50) for c in color))
    img.paste(inner, (size // 4, size // 4))
    img.save(buf, "PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    caps: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(
        self, code: int, body: bytes, ctype: str = "image/png", extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/img/"):
            try:
                i = int(path.rsplit("/", 1)[1].split(".")[0])
                color_word = self.caps[i].split()[1]
            except (ValueError, IndexError):
                self._send(404, b"not found", "text/plain")
                return
            self._send(200, png_bytes(RGB[color_word]))
        elif path == "/red.png":
            self._send(200, png_bytes(RGB["red"]))
        elif path == "/blue.png":
            self._send(200, png_bytes(RGB["blue"]))
        elif path == "/big.png":
            self._send(200, b"\0" * (3 * 1024 * 1024))
        elif path == "/slow.png":
            time.sleep(20.0)  # far past test_serve_fetch's 5 s deadline
            self._send(200, png_bytes(RGB["red"]))
        elif path == "/notimage.png":
            self._send(200, b"<html>nope</html>", "text/html")
        elif path == "/to-red":
            self._send(302, b"", "text/plain", {"Location": "/red.png"})
        elif path == "/to-private":
            port = self.server.server_address[1]
            self._send(302, b"", "text/plain", {"Location": f"http://127.0.0.2:{port}/red.png"})
        elif path == "/to-idna":  # a malformed IDNA host (A-label ending in a hyphen)
            self._send(302, b"", "text/plain", {"Location": "http://xn--localhost-/a.png"})
        elif path == "/to-bad-port":
            self._send(302, b"", "text/plain", {"Location": "http://127.0.0.1:99999/a.png"})
        elif path == "/loop":
            self._send(302, b"", "text/plain", {"Location": "/loop"})
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    _Handler.caps = captions(N, 0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def encoder() -> FakeEncoder:
    return FakeEncoder(32)


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory, image_server: str, encoder: FakeEncoder) -> str:
    folder = str(tmp_path_factory.mktemp("serve") / "index")
    build_index(folder, n=N, encoder=encoder, duplicates=5, url_base=image_server + "/img")
    return folder


@pytest.fixture(scope="session")
def ivf_dir(tmp_path_factory: pytest.TempPathFactory, encoder: FakeEncoder) -> str:
    folder = str(tmp_path_factory.mktemp("serve") / "ivf")
    build_index(
        folder,
        n=20_000,
        encoder=encoder,
        image_factory="IVF64,PQ8x4fs",
        text_factory="IVF64,Flat",
        search_params={"nprobe": 8},
        vectors_file=True,
        seed=1,
    )
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app: object):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
