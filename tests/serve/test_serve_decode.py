"""Query images: decoded at reduced size in bounded memory, admitted by count and memory (queue, then 503)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipsearch.embed.preprocess import ImagePreprocessor
from clipsearch.errors import InputError
from clipsearch.serve.decode import (
    DecodeBusy,
    DecodeGate,
    DecodeTooCostly,
    decode,
    plan_decode,
)

HW = ImagePreprocessor()  # CLIP's: 224 px shortest edge, centre crop
MAXPX = 40_000_000


def picture(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth picture with some detail (gradients and a disc), so reductions can be compared."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = (x / w * 255).astype(np.uint8)
    g = (y / h * 255).astype(np.uint8)
    b = ((((x - w / 2) ** 2 + (y - h / 2) ** 2) < (min(w, h) / 3) ** 2) * 200).astype(np.uint8)
    img = Image.fromarray(np.stack([r, g, b], axis=-1))
    return img.convert(mode) if mode != "RGB" else img


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    if kw.pop("interlace", False):  # Pillow writes no Adam7 PNG; libvips does
        import pyvips

        v = pyvips.Image.new_from_memory(img.tobytes(), img.width, img.height, len(img.getbands()), "uchar")
        return v.pngsave_buffer(interlace=True)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big() -> Image.Image:
    return picture(2400, 1800)


def _close(a: Image.Image, b: Image.Image, tol: float) -> None:
    assert a.size == b.size, (a.size, b.size)
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
    assert diff <= tol, diff


def test_small_images_decode_exactly_as_before():
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        data = encoded(picture(640, 480), fmt)
        plan = plan_decode(data, HW, MAXPX)
        assert plan.path == "pillow" and plan.factor == 1, fmt
        expected = Image.open(io.BytesIO(data)).convert("RGB")
        assert np.array_equal(np.asarray(decode(plan)), np.asarray(expected)), fmt


@pytest.mark.parametrize(
    "fmt,kw,path",
    [
        ("PNG", {}, "vips-png"),
        ("WEBP", {"lossless": True}, "vips-webp"),
        ("WEBP", {"quality": 90}, "vips-webp"),
        ("PNG", {"interlace": True}, "pillow-strips"),  # Adam7 is decoded whole, at its own depth
        ("GIF", {}, "pillow-strips"),
        ("TIFF", {"compression": "tiff_deflate"}, "pillow-strips"),
    ],
)
def test_large_images_are_reduced_while_decoding(big, fmt, kw, path):
    data = encoded(big, fmt, **kw)
    plan = plan_decode(data, HW, MAXPX)
    assert plan.path == path and plan.factor == 4  # 1800 / (2 * 224) -> 4: at least twice the input size
    img = decode(plan)
    assert img.mode == "RGB" and min(img.size) >= 2 * 224
    reference = Image.open(io.BytesIO(data)).convert("RGB").reduce(4)
    _close(img.crop((0, 0, *reference.size)), reference, tol=2.5 if fmt == "GIF" else 1.5)
    if path.startswith("vips"):
        assert plan.cost < 30 * 1024 * 1024  # rows, not the whole image (2400 x 1800 x 4 = 16.5 MB)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "1"])
def test_large_png_of_every_mode_decodes_to_rgb(mode):
    img = picture(1800, 1800, "L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img, np.uint16) * 257).astype(np.uint16))
    data = encoded(img, "PNG")
    plan = plan_decode(data, HW, MAXPX)
    assert plan.path == "vips-png"
    out = decode(plan)
    assert out.mode == "RGB" and out.size == (450, 450)
    ref = Image.open(io.BytesIO(data))
    ref = (ref.convert("RGBA") if mode in ("LA", "P") else ref).convert("RGB").reduce(4)
    if mode == "I;16":  # Pillow clips 16-bit grey to 255; libvips keeps the high byte
        ref = Image.fromarray((np.asarray(Image.open(io.BytesIO(data)), np.uint16) >> 8).astype(np.uint8))
        ref = ref.convert("RGB").reduce(4)
    _close(out, ref, tol=1.5)


def test_large_jpeg_decodes_like_the_embed_stage(big):
    """A query image gets the pixels its indexed copy got: the same draft as embed's preprocessor."""
    for progressive in (False, True):
        data = encoded(big, "JPEG", quality=90, progressive=progressive)
        plan = plan_decode(data, HW, MAXPX)
        assert plan.path == "jpeg-draft" and plan.draft == (447, 336)  # >= 1.5x the 298 x 224 resize
        img = decode(plan)
        assert img.size == (600, 450)  # libjpeg's 1/4 scale: the smallest at least (447, 336)
        assert np.array_equal(np.asarray(img), np.asarray(ImagePreprocessor().decode(data)))
        coefficients = 2400 * 1800 * 2 * 1.5  # 4:2:0: Y plus two quarter-size chroma planes
        assert (plan.cost >= coefficients) == progressive  # libjpeg holds a progressive image whole
    for w, h in ((1000, 750), (700, 2100), (4000, 700)):  # near the 3x threshold, and tall or wide
        data = encoded(picture(w, h), "JPEG", quality=85)
        plan = plan_decode(data, HW, MAXPX)
        assert plan.draft == HW.jpeg_draft_size(h, w), (w, h)
        assert np.array_equal(np.asarray(decode(plan)), np.asarray(ImagePreprocessor().decode(data))), (w, h)


def test_header_errors_and_pixel_limit():
    with pytest.raises(InputError, match="empty"):
        plan_decode(b"", HW, MAXPX)
    with pytest.raises(InputError) as e:
        plan_decode(b"GIF89a not really", HW, MAXPX)
    assert "could not be decoded" in str(e.value) and "Error" not in str(e.value)
    with pytest.raises(DecodeTooCostly, match="over the 1000000 pixels limit") as e:
        plan_decode(encoded(picture(1100, 1000), "PNG"), HW, 1_000_000)
    assert e.value.status == 413
    data = encoded(picture(1800, 1800), "PNG")
    plan = plan_decode(data[: len(data) // 2], HW, MAXPX)  # a truncated PNG fails in the decoder
    with pytest.raises(InputError, match="could not be decoded"):
        decode(plan)


_MEMORY_SCRIPT = """
import io, json, resource, sys
from PIL import Image
from clipsearch.embed.preprocess import ImagePreprocessor
from clipsearch.serve.decode import decode, plan_decode
data = open(sys.argv[1], "rb").read()
warm = io.BytesIO(); Image.new("RGB", (1000, 1000)).save(warm, "PNG")
assert plan_decode(warm.getvalue(), ImagePreprocessor(), 40_000_000).path == "vips-png"
decode(plan_decode(warm.getvalue(), ImagePreprocessor(), 40_000_000))  # libvips' one-time start-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
plan = plan_decode(data, ImagePreprocessor(), 40_000_000)
out = decode(plan)
print(json.dumps({"size": out.size, "path": plan.path, "cost": plan.cost,
                  "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def bomb_png() -> bytes:
    """The review's 131 KB PNG of 6300 x 6300 pixels (flat colours compress about 1000:1)."""
    img = Image.new("RGB", (6300, 6300), (200, 30, 40))
    img.paste(Image.new("RGB", (3000, 3000), (20, 200, 40)), (1000, 1000))
    return encoded(img, "PNG", compress_level=9)


def test_a_6300px_png_bomb_decodes_in_a_few_mb(tmp_path):
    """Pillow held ~300 MB for it (the whole image, then its RGB copy); now a few rows at a time."""
    data = bomb_png()
    assert len(data) < 200_000
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    out = json.loads(subprocess.check_output([sys.executable, "-c", _MEMORY_SCRIPT, str(path)], text=True))
    assert out["path"] == "vips-png" and out["size"] == [450, 450]
    assert out["peak_mb"] < 40, out  # Pillow: 2 x 6300^2 x 4 bytes = 303 MB
    assert out["cost"] < 40 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- the gate
def test_gate_limits_slots_and_memory_first_come_first_served():
    async def main() -> None:
        gate = DecodeGate(slots=2, memory_bytes=100, max_waiting=10, wait_s=5)
        order: list[str] = []
        release = asyncio.Event()

        async def job(name: str, cost: int) -> None:
            async with gate.admit(cost):
                order.append(name)
                assert gate.in_flight <= 2 and gate.reserved <= 100
                await release.wait()

        tasks = [asyncio.create_task(job(n, c)) for n, c in (("a", 60), ("b", 30), ("c", 50), ("d", 5))]
        await asyncio.sleep(0.05)
        assert (
            order == ["a", "b"] and gate.waiting == 2
        )  # c does not fit (60 + 30 + 50 > 100); d waits behind c
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c", "d"] and gate.in_flight == 0 and gate.reserved == 0
        assert gate.peak_in_flight == 2

    asyncio.run(main())


def test_gate_refuses_beyond_the_queue_the_wait_and_the_budget():
    async def main() -> None:
        gate = DecodeGate(slots=1, memory_bytes=100, max_waiting=1, wait_s=0.2)
        with pytest.raises(DecodeTooCostly, match="decode_memory_mb"):
            await gate.acquire(101)
        await gate.acquire(10)  # holds the only slot
        waiter = asyncio.create_task(gate.acquire(10))
        await asyncio.sleep(0.01)
        with pytest.raises(DecodeBusy, match="waiting") as e:  # the queue (1) is full
            await gate.acquire(10)
        assert e.value.status == 503 and e.value.retry_after_s >= 1
        with pytest.raises(DecodeBusy, match="waited 0.2 s"):
            await waiter
        assert gate.waiting == 0
        cancelled = asyncio.create_task(gate.acquire(10))  # a client that goes away while waiting
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        gate.release(10)
        assert gate.in_flight == 0 and gate.reserved == 0 and gate.waiting == 0
        await gate.acquire(10)  # free again
        gate.release(10)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- over HTTP
class SlowImages:
    """Wraps an encoder: image encodes take `delay` seconds, so that decodes pile up at the gate."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.name, self.dim = inner.name, inner.dim

    def encode_text(self, texts):
        return self.inner.encode_text(texts)

    def encode_images(self, images):
        import time

        time.sleep(self.delay)
        return self.inner.encode_images(images)


def _app(index_dir, encoder, **settings):
    from clipsearch.serve import ServeConfig, create_app

    return create_app(ServeConfig(indices={"shapes": index_dir}, **settings), encoder=encoder)


def test_image_queries_beyond_the_queue_get_503_with_retry_after(index_dir, encoder):
    import httpx

    app = _app(index_dir, SlowImages(encoder, 0.3), decode_slots=1, decode_queue=1, decode_wait_s=5)
    files = {"image": ("q.png", encoded(picture(64, 64), "PNG"), "image/png")}

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/knn", files=files, data={"k": "3"}) for _ in range(4)))

    codes = sorted(r.status_code for r in asyncio.run(main()))
    assert codes == [200, 200, 503, 503]  # one decoding, one waiting, two refused
    busy = [r for r in asyncio.run(main()) if r.status_code == 503][0]
    assert int(busy.headers["retry-after"]) >= 1 and "retry shortly" in busy.json()["detail"]


def test_image_over_the_decode_memory_budget_is_413(index_dir, encoder):
    from fastapi.testclient import TestClient

    with TestClient(_app(index_dir, encoder, decode_memory_mb=32)) as c:
        pixels = picture(3000, 4000)
        adam7 = encoded(pixels, "PNG", interlace=True)  # decoded whole: 48 MB at 4 bytes per pixel
        r = c.post("/knn", files={"image": ("q.png", adam7, "image/png")})
        assert r.status_code == 413 and "decode_memory_mb" in r.json()["detail"]
        png = encoded(pixels, "PNG")  # the same pixels, not interlaced: read a few rows at a time
        r = c.post("/knn", files={"image": ("q.png", png, "image/png")})
        assert r.status_code == 200, r.text
        assert {"queue", "decode", "encode"} <= set(r.json()["timings_ms"])


def test_bomb_png_query_finds_its_colour(index_dir, encoder):
    """The 6300 x 6300 PNG is decoded reduced and still searched by its dominant colour."""
    from fastapi.testclient import TestClient

    from .helpers import RGB

    img = Image.new("RGB", (6300, 6300), RGB["blue"])
    with TestClient(_app(index_dir, encoder)) as c:
        r = c.post("/knn", files={"image": ("q.png", encoded(img, "PNG", compress_level=9), "image/png")})
        assert r.status_code == 200, r.text
        assert all("blue" in h["caption"] for h in r.json()["results"][:3])
