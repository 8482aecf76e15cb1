"""Decode, check, resize and encode one image with Pillow.

The header is read first (Image.open is lazy), so an image rejected by size, area, aspect ratio or as a
decompression bomb is never decoded. JPEGs being downscaled are decoded at reduced scale (DCT scaling via
`Image.draft`), which skips most of the decode work; the remaining resize is then at most 2x.
Pillow releases the GIL while it decodes, resizes and encodes, so this runs well in a thread pool.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageFile, ImageOps

from clipsearch.download import blur
from clipsearch.download.config import DownloadConfig

logger = logging.getLogger(__name__)

#: images with more pixels than this are refused before decoding (Pillow's own bomb limit)
BOMB_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_WHITE = (255, 255, 255)


class ImageError(Exception):
    """The image is unusable; the message is the sample's error_message."""


class BlurFailed(ImageError):
    """The boxes could not be blurred; the sample is not stored (status failed_to_blur)."""


@dataclass
class Processed:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    exif: str | None = None


def target_size(w: int, h: int, cfg: DownloadConfig) -> tuple[int, int] | None:
    """The size to resize (w, h) to before any padding or cropping; None for no resize."""
    s = cfg.image_size
    mode = cfg.resize_mode
    if mode == "no":
        return None
    if mode in ("keep_ratio", "center_crop"):
        scale = s / min(w, h)
    else:  # border, keep_ratio_largest
        scale = s / max(w, h)
    if cfg.resize_only_if_bigger and scale >= 1:
        return None
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    return None if (tw, th) == (w, h) else (tw, th)


def process(data: bytes, cfg: DownloadConfig, boxes: tuple[blur.Box, ...] = ()) -> Processed:
    """Turn downloaded bytes into the stored image, or raise ImageError with the reason.

    `boxes` (relative [x0, y0, x1, y1] on the stored pixel grid of the original) are blurred after the
    resize and before padding or cropping, as img2dataset does. An image with boxes is always decoded
    and re-encoded, whatever --skip-reencode or --disable-all-reencoding say: its original bytes show
    the faces."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("decompression bomb") from e
    except Exception as e:
        raise ImageError("not a decodable image") from e
    ow, oh = img.size
    if ow < 1 or oh < 1:
        raise ImageError("image has no pixels")
    if ow * oh > BOMB_PIXELS:
        raise ImageError(f"decompression bomb ({ow}x{oh})")
    if min(ow, oh) < cfg.min_image_size:
        raise ImageError(f"image too small (< {cfg.min_image_size}px)")
    if cfg.max_image_area is not None and ow * oh > cfg.max_image_area:
        raise ImageError(f"image area too large (> {cfg.max_image_area:g})")
    if cfg.max_aspect_ratio is not None and max(ow, oh) / min(ow, oh) > cfg.max_aspect_ratio:
        raise ImageError(f"aspect ratio too large (> {cfg.max_aspect_ratio:g})")
    exif = _exif_json(img) if cfg.extract_exif else None

    src_fmt = (img.format or "").upper()
    size = target_size(ow, oh, cfg)
    keep_bytes = cfg.disable_all_reencoding or (
        cfg.skip_reencode
        and size is None
        and cfg.resize_mode != "border"
        and src_fmt == _PIL_FORMAT[cfg.encode_format]
    )
    if keep_bytes and not boxes:
        if cfg.skip_reencode and not cfg.disable_all_reencoding:
            _verify(img)
        return Processed(data, ow, oh, ow, oh, exif)
    if cfg.disable_all_reencoding:  # a sample with boxes: blurred and encoded, at its own size
        size = None

    try:
        if size is not None and src_fmt == "JPEG" and size[0] < ow:
            img.draft("RGB", size)  # DCT-domain downscale: decodes at 1/2, 1/4 or 1/8 scale
        img.load()
        img, orientation = _oriented(img)
        swapped = orientation >= 5
        img, alpha = _to_rgb_or_premultiplied(img)
        if size is not None and swapped:
            size = (size[1], size[0])
        if size is not None and size != img.size:
            down = size[0] < img.width
            filt = _FILTERS[cfg.downscale_interpolation if down else cfg.upscale_interpolation]
            img = img.resize(size, filt, reducing_gap=3.0 if down else None)
        if alpha:
            img = _flatten_on_white(img)
        if boxes:
            img = _blur(img, blur.orient_boxes(boxes, orientation), cfg)
        if not cfg.disable_all_reencoding:
            img = _finish(img, cfg)
        buf = io.BytesIO()
        fmt = _PIL_FORMAT[cfg.encode_format]
        if fmt == "PNG":
            img.save(buf, fmt, compress_level=cfg.quality)
        else:
            img.save(buf, fmt, quality=cfg.quality)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("decompression bomb") from e
    except OSError as e:
        msg = str(e).split(" (")[0] or type(e).__name__
        raise ImageError(f"decode failed: {msg}") from e
    except Exception as e:  # Pillow raises a zoo of types on corrupt data
        raise ImageError(f"decode failed: {type(e).__name__}") from e
    return Processed(buf.getvalue(), img.width, img.height, ow, oh, exif)


def _blur(img: Image.Image, boxes: tuple[blur.Box, ...], cfg: DownloadConfig) -> Image.Image:
    try:
        arr = blur.blur_array(np.asarray(img), boxes, cfg.blur_strength)
    except MemoryError as e:
        raise BlurFailed(f"blur failed: out of memory for a {img.width}x{img.height} image") from e
    except Exception as e:  # never store the sample unblurred
        raise BlurFailed(f"blur failed: {type(e).__name__}: {e}") from e
    return Image.fromarray(arr)


def _verify(img: Image.Image) -> None:
    try:
        img.verify()
    except Exception as e:
        raise ImageError("corrupt image") from e


def _oriented(img: Image.Image) -> tuple[Image.Image, int]:
    """Apply the EXIF orientation; also say which it was (1: none; 5-8 swap width and height)."""
    if "exif" not in img.info:
        return img, 1
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img), orientation
    except Exception:
        logger.debug("bad EXIF orientation ignored")
    return img, 1


def _to_rgb_or_premultiplied(img: Image.Image) -> tuple[Image.Image, bool]:
    """RGB, or premultiplied RGBa for images with transparency (resized before being flattened, which is
    both cheaper and free of the dark fringes a straight-alpha resize leaves)."""
    if img.mode == "RGB":
        return img, False
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        if img.mode != "RGBA":
            img = img.convert("RGBA")
        return img.convert("RGBa"), True
    return img.convert("RGB"), False


def _flatten_on_white(img: Image.Image) -> Image.Image:
    """Composite a premultiplied RGBa image on white: c + (255 - a) per channel."""
    r, g, b, a = img.split()
    inv = ImageChops.invert(a)
    return Image.merge("RGB", [ImageChops.add(c, inv) for c in (r, g, b)])


def _finish(img: Image.Image, cfg: DownloadConfig) -> Image.Image:
    s = cfg.image_size
    if cfg.resize_mode == "border":
        if img.size == (s, s) or (cfg.resize_only_if_bigger and max(img.size) < s):
            return img
        canvas = Image.new("RGB", (s, s), _WHITE)
        canvas.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
        return canvas
    if cfg.resize_mode == "center_crop":
        if img.width < s or img.height < s:
            return img  # only with resize_only_if_bigger on a small image
        left, top = (img.width - s) // 2, (img.height - s) // 2
        return img.crop((left, top, left + s, top + s))
    return img


def _exif_json(img: Image.Image) -> str | None:
    try:
        exif = img.getexif()
        if not exif:
            return None
        out = {}
        items = dict(exif.items())
        try:
            items.update(exif.get_ifd(ExifTags.IFD.Exif))
        except Exception:
            logger.debug("no EXIF sub-IFD")
        for tag, value in items.items():
            name = ExifTags.TAGS.get(tag, str(tag))
            if isinstance(value, bytes):
                if len(value) > 256:
                    continue
                value = value.decode("latin-1", "replace").rstrip("\x00")
            out[name] = value if isinstance(value, int | float | str) else str(value)
        return json.dumps(out, sort_keys=True, default=str)
    except Exception:
        return None


# we refuse those images ourselves, before decoding; the warning would only be noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# truncated files must fail, not be silently padded with grey
ImageFile.LOAD_TRUNCATED_IMAGES = False
