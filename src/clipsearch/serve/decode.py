"""Query images decoded in bounded memory, straight to about twice the model's input size.

`plan_decode(data, preprocessor, max_pixels)` reads only the header and picks a path; `DecodePlan.cost` is
the most memory that path holds at once (bytes, an upper estimate), which `DecodeGate` admits against its
budget. `decode(plan)` then decodes:

- a JPEG large enough for the embed stage's draft rule (`ImagePreprocessor.jpeg_draft_size`: >= 3x the
  model's input, to >= 1.5x it) goes through Pillow's draft mode (libjpeg's DCT scaling, 1/2 to 1/8)
  exactly as the embed stage decodes it, so a query image gets the pixels its indexed copy got. libjpeg
  keeps a progressive JPEG's coefficients for the whole image (2 bytes per sample), which the cost counts;
- another image less than 4x the model's input on a side is decoded whole by Pillow, as before;
- a larger non-interlaced PNG is read sequentially by libvips and shrunk by an integer factor (a box
  filter, like Pillow's `reduce`) to >= 2x the input while it is read, so only a few rows are in memory; a
  larger WebP is scaled inside libwebp's decoder;
- anything else (GIF, BMP, TIFF, interlaced PNG, ...) is decoded whole by Pillow at its own depth (1 to 4
  bytes per pixel), then converted and reduced in strips, never copied whole.
The model's own resize (bicubic) then takes the reduced image to its input size.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import os
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clipsearch.embed.preprocess import ImagePreprocessor
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)

UNREADABLE = "the image could not be decoded: not an image in a supported format (JPEG, PNG, WebP, GIF, ...) or damaged"
MB = 1024 * 1024
# libvips' buffers for one sequential decode: a fixed part, and rows of the image's full width (measured
# with shrinkh before shrinkv: 3.4 / 6.6 / 12 / 26 MB at 1,000 / 3,000 / 6,300 / 12,000 px wide, 8-bit RGB)
VIPS_FIXED = 8 * MB
VIPS_ROW_BYTES = 4096  # per pixel of width and byte per sample (16-bit samples count twice)
STRIP_ROWS = 256  # rows converted at a time on the whole-frame path

# bytes per pixel of a Pillow image in memory, by mode (RGB is stored as 4 bytes, "1" as 1)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def preprocessor_of(encoder: Any) -> ImagePreprocessor:
    """The encoder's image preprocessor (its resize and JPEG draft rules); CLIP's 224 px one otherwise."""
    pp = getattr(encoder, "preprocessor", None)
    return pp if isinstance(pp, ImagePreprocessor) else ImagePreprocessor()


@dataclass
class DecodePlan:
    data: bytes
    format: str
    width: int
    height: int
    mode: str
    path: str  # pillow | jpeg-draft | vips-png | vips-webp | pillow-strips
    factor: int  # integer reduction of each side (1 = none)
    cost: int  # bytes held at the peak (upper estimate)
    draft: tuple[int, int] | None = None  # (w, h) asked of the JPEG draft


def _reduction(w: int, h: int, pp: ImagePreprocessor) -> tuple[int, int, int]:
    """(factor, target w, target h): reduce only when the image is >= 4x the model's resize on both sides,
    to >= 2x it."""
    th, tw = pp._resize_hw(h, w)
    if h >= 4 * th and w >= 4 * tw:
        return max(1, min(h // (2 * th), w // (2 * tw))), tw, th
    return 1, tw, th


def _native_bytes(mode: str) -> int:
    return _MODE_BYTES.get(mode, 4)


def _jpeg_coefficients(img: Image.Image, w: int, h: int) -> int:
    """Bytes of libjpeg's whole-image coefficient buffer (progressive or multi-scan JPEGs)."""
    layers = getattr(img, "layer", None) or []
    if not layers:
        return w * h * 2 * 4
    hmax = max(int(lay[1]) for lay in layers) or 1
    vmax = max(int(lay[2]) for lay in layers) or 1
    samples = sum(int(lay[1]) * int(lay[2]) / (hmax * vmax) for lay in layers)
    return int(w * h * samples * 2)


def plan_decode(data: bytes, pp: ImagePreprocessor, max_pixels: int) -> DecodePlan:
    """Read the header of `data` and choose how to decode it for the model whose preprocessor is `pp`;
    InputError when unreadable, DecodeTooCostly when too large."""
    if not data:
        raise InputError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # size is checked here, against our own limit
            img = Image.open(io.BytesIO(data))
            fmt, mode = (img.format or "").upper(), img.mode
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeTooCostly(
                    f"the image is {w}x{h}, over the {max_pixels} pixels limit (max_image_pixels)"
                )
            if w < 1 or h < 1:
                raise InputError(UNREADABLE)
            draft = pp.jpeg_draft_size(h, w) if fmt == "JPEG" and pp.draft else None
            if draft is not None:  # the embed stage's rule, so that a query gets its indexed copy's pixels
                img.draft("RGB", draft)  # only sets libjpeg's scale; nothing is decoded
                dw, dh = img.size
                cost = 2 * dw * dh * 4  # the decoded draft and its RGB conversion
                if img.info.get("progressive") or img.info.get("progression"):
                    cost += _jpeg_coefficients(img, w, h)
                return DecodePlan(data, fmt, w, h, mode, "jpeg-draft", 1, cost, draft)
            factor, tw, th = _reduction(w, h, pp)
            out = (w // factor) * (h // factor) * 4
            if factor > 1 and fmt in ("PNG", "WEBP") and not img.info.get("interlace"):
                sample = 2 if fmt == "PNG" and len(data) > 24 and data[24] == 16 else 1  # IHDR bit depth
                cost = VIPS_FIXED + w * VIPS_ROW_BYTES * sample + 2 * out
                return DecodePlan(data, fmt, w, h, mode, f"vips-{fmt.lower()}", factor, cost)
            native = w * h * _native_bytes(mode)
            if factor > 1:
                return DecodePlan(data, fmt, w, h, mode, "pillow-strips", factor, native + out + 8 * MB)
            # whole image, then Pillow's convert("RGB") copy (the path small query images always took)
            return DecodePlan(data, fmt, w, h, mode, "pillow", factor, native + w * h * 4)
    except InputError:
        raise
    except Image.DecompressionBombError:  # Pillow's own cap (2 x 89 M pixels), far above ours
        raise DecodeTooCostly(f"the image is over the {max_pixels} pixels limit (max_image_pixels)") from None
    except Exception as e:  # Pillow raises many types on unknown or corrupt headers
        logger.info("image header could not be read: %s: %s", type(e).__name__, e)
        raise InputError(UNREADABLE) from None


def decode(plan: DecodePlan) -> Image.Image:
    """Decode along `plan` into an RGB Pillow image; InputError when the data is corrupt."""
    # (no warnings.catch_warnings here: it changes process-wide state, and this runs on several threads)
    try:
        if plan.path in ("vips-png", "vips-webp"):
            return _decode_vips(plan)
        img = Image.open(io.BytesIO(plan.data))
        if plan.path == "jpeg-draft" and plan.draft is not None:
            img.draft("RGB", plan.draft)
        img.load()
        if plan.path == "pillow-strips":
            return _reduce_in_strips(img, plan.factor)
        return img.convert("RGB")
    except InputError:
        raise
    except Exception as e:  # Pillow and libvips raise many types on corrupt data
        logger.info(
            "image could not be decoded (%s, %s): %s: %s", plan.format, plan.path, type(e).__name__, e
        )
        raise InputError(UNREADABLE) from None


def _reduce_in_strips(img: Image.Image, f: int) -> Image.Image:
    """convert("RGB") then reduce(f) of a whole decoded frame, a strip of rows at a time (no whole copy)."""
    w, h = (img.width // f) * f, (img.height // f) * f
    out = Image.new("RGB", (w // f, h // f))
    step = max(f, (STRIP_ROWS // f) * f)
    for y in range(0, h, step):
        strip = img.crop((0, y, w, min(h, y + step)))
        if strip.mode != "RGB":
            strip = (
                strip.convert("RGBA").convert("RGB") if "transparency" in img.info else strip.convert("RGB")
            )
        out.paste(strip.reduce(f), (0, y // f))
    return out


_vips: Any = None


def _pyvips() -> Any:
    global _vips
    if _vips is None:
        import pyvips

        pyvips.cache_set_max(0)  # no operation cache: every query image is new
        pyvips.concurrency_set(1)  # one thread per decode; the gate decides how many run at once
        if hasattr(pyvips, "block_untrusted_set"):
            pyvips.block_untrusted_set(True)
        _vips = pyvips
    return _vips


def _decode_vips(plan: DecodePlan) -> Image.Image:
    vips = _pyvips()
    f = plan.factor
    if plan.path == "vips-webp":
        v = vips.Image.webpload_buffer(plan.data, scale=1.0 / f, fail_on="truncated")
    else:
        v = vips.Image.pngload_buffer(plan.data, access="sequential", fail_on="truncated")
        # a box filter over f x f pixels, pulled row by row from the decoder; shrinking the width first
        # keeps the rows libvips buffers narrow (12 vs 21 MB at 6,300 px wide)
        v = v.shrinkh(f).shrinkv(f)
    if v.format == "ushort":
        v = (v >> 8).cast("uchar")  # 16-bit samples: the high byte, as Pillow keeps
    elif v.format != "uchar":
        v = v.cast("uchar")
    if v.bands in (1, 2):  # grey (+ alpha): grey in all three channels
        v = v[0].bandjoin([v[0], v[0]])
    elif v.bands > 3:  # drop alpha, as Pillow's convert("RGB") does
        v = v[:3]
    return Image.frombytes("RGB", (v.width, v.height), v.write_to_memory())


# ---------------------------------------------------------------------------------------------- admission
class DecodeBusy(InputError):
    """Too many images are waiting to be decoded (HTTP 503 with Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ImageTooLarge(InputError):
    """An inline or uploaded image over --max-image-mb (HTTP 413, as an image_url body over it)."""

    status = 413


class DecodeTooCostly(InputError):
    """An image over the pixel limit, or whose decode alone needs more memory than the whole decode budget
    (HTTP 413)."""

    status = 413


def default_slots() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores)


class DecodeGate:
    """Admits image decodes first come, first served: at most `slots` at once, and at most `memory_bytes`
    of estimated decode memory at once. Up to `max_waiting` requests queue, each at most `wait_s` seconds;
    beyond that a request gets DecodeBusy (503 + Retry-After). Used from the event loop only.

    `executor` runs the admitted work (the decode, then the image encode) on `slots` threads of its own, so
    that image queries never hold the text encoder's threads: on 2 busy cores, text queries at 50 q/s kept a
    p99 of 75-79 ms during 8 concurrent 6300 px PNG queries, against 210-332 ms with the image encodes
    on the text encoder's threads (docs/bench-serve.md)."""

    def __init__(self, slots: int, memory_bytes: int, max_waiting: int, wait_s: float):
        self.slots = max(1, int(slots))
        self.executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="clipsearch-image")
        self.memory_bytes = int(memory_bytes)
        self.max_waiting = int(max_waiting)
        self.wait_s = float(wait_s)
        self.in_flight = 0
        self.reserved = 0
        self.peak_in_flight = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fits(self, cost: int) -> bool:
        return self.in_flight < self.slots and self.reserved + cost <= self.memory_bytes

    def _take(self, cost: int) -> None:
        self.in_flight += 1
        self.reserved += cost
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            cost, fut = self._queue.popleft()
            if fut.done():  # its request gave up
                continue
            self._take(cost)
            fut.set_result(None)

    def release(self, cost: int) -> None:
        self.in_flight -= 1
        self.reserved -= cost
        self._wake()

    async def acquire(self, cost: int) -> None:
        if cost > self.memory_bytes:
            raise DecodeTooCostly(
                f"the image needs about {cost // MB} MB to decode, over the {self.memory_bytes // MB} MB "
                "decode memory limit (decode_memory_mb); send it smaller, or as a baseline JPEG or a "
                "non-interlaced PNG, which are decoded at reduced size"
            )
        if not self._queue and self._fits(cost):
            self._take(cost)
            return
        if len(self._queue) >= self.max_waiting:
            raise DecodeBusy(
                f"too many images are waiting to be decoded ({len(self._queue)} waiting, {self.slots} at once): "
                "retry shortly",
                retry_after_s=max(1, int(self.wait_s / 4)),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, fut)
        self._queue.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=self.wait_s)
        except TimeoutError:
            if fut.done():  # admitted at the last moment: keep the slot
                return
            fut.cancel()
            self._remove(entry)
            raise DecodeBusy(
                f"the image waited {self.wait_s:g} s for a decode slot ({self.slots} at once): retry shortly",
                retry_after_s=max(1, int(self.wait_s / 4)),
            ) from None
        except asyncio.CancelledError:  # the client went away
            if fut.done() and not fut.cancelled():
                self.release(cost)
            else:
                fut.cancel()
                self._remove(entry)
            raise

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _remove(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        try:
            self._queue.remove(entry)
        except ValueError:
            pass
        self._wake()  # the head may have been the one that did not fit

    @asynccontextmanager
    async def admit(self, cost: int) -> AsyncIterator[None]:
        await self.acquire(cost)
        try:
            yield
        finally:
            self.release(cost)
