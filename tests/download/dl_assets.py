"""Test images generated in memory, shared by the download tests and their HTTP server."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _img(
    fmt: str, size: tuple[int, int], mode: str = "RGB", color=(200, 30, 30), exif: bool = False
) -> bytes:
    im = Image.new(mode, size, color if mode != "RGBA" else (*color, 128))
    # some structure, so resizes are not trivially uniform
    for x in range(0, size[0], max(1, size[0] // 8)):
        for y in range(size[1]):
            im.putpixel((x, y), (0, 0, 0) if mode == "RGB" else (0, 0, 0, 255))
    buf = io.BytesIO()
    kw = {}
    if exif:
        ex = Image.Exif()
        ex[0x010F] = "ClipsearchCam"  # Make
        ex[0x0110] = "Model 1"  # Model
        kw["exif"] = ex.tobytes()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _textured(size: tuple[int, int], cell: int) -> bytes:
    """A checkerboard photo: every blurred pixel shows."""
    w, h = size
    im = Image.new("RGB", size)
    im.putdata(
        [(230, 40, 40) if (x // cell + y // cell) % 2 else (20, 60, 220) for y in range(h) for x in range(w)]
    )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


ASSETS = {
    "big.jpg": ("image/jpeg", _img("JPEG", (1024, 768))),
    "tall.jpg": ("image/jpeg", _img("JPEG", (300, 900))),
    "small.jpg": ("image/jpeg", _img("JPEG", (40, 30))),
    "alpha.png": ("image/png", _img("PNG", (500, 400), "RGBA", (10, 200, 10))),
    "pic.webp": ("image/webp", _img("WEBP", (640, 480), color=(10, 10, 200))),
    "exif.jpg": ("image/jpeg", _img("JPEG", (320, 240), exif=True)),
    "other.jpg": ("image/jpeg", _img("JPEG", (600, 600), color=(250, 250, 0))),
    "face.jpg": ("image/jpeg", _textured((640, 480), 16)),
    "bomb.png": ("image/png", _png_bomb(12000, 12000)),
    "hugebomb.png": ("image/png", _png_bomb(60000, 60000)),
    "trunc.jpg": ("image/jpeg", _img("JPEG", (800, 600))[:3000]),
    "notimage.jpg": ("image/jpeg", b"<html>this is not an image</html>"),
}
