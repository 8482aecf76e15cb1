"""Decode/resize/encode: every mode, the checks that must not decode, the JPEG reduced-scale path."""

from __future__ import annotations

import io
import json

import pytest
from dl_assets import ASSETS, _img
from PIL import Image, ImageFile, JpegImagePlugin

from clipsearch.download import resize
from clipsearch.download.config import DownloadConfig

# the bomb fixtures trip Pillow's own warning before our check refuses them
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def cfg(**kw) -> DownloadConfig:
    return DownloadConfig(url_list="u.txt", output_folder="o", **kw)


def dims(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize(
    "mode,src,expected",
    [
        ("border", (1024, 768), (256, 256)),
        ("border", (300, 900), (256, 256)),
        ("keep_ratio", (1024, 768), (341, 256)),
        ("keep_ratio", (300, 900), (256, 768)),
        ("keep_ratio_largest", (1024, 768), (256, 192)),
        ("keep_ratio_largest", (300, 900), (85, 256)),
        ("center_crop", (1024, 768), (256, 256)),
        ("center_crop", (300, 900), (256, 256)),
        ("no", (1024, 768), (1024, 768)),
        ("border", (40, 30), (256, 256)),  # upscaled, then padded
    ],
)
def test_resize_modes(mode, src, expected):
    p = resize.process(_img("JPEG", src), cfg(resize_mode=mode))
    assert (p.width, p.height) == expected == dims(p.data)
    assert (p.original_width, p.original_height) == src
    assert Image.open(io.BytesIO(p.data)).format == "JPEG"


def test_border_pads_with_white_and_keeps_content_centered():
    p = resize.process(_img("JPEG", (1024, 512), color=(200, 30, 30)), cfg(resize_mode="border"))
    im = Image.open(io.BytesIO(p.data)).convert("RGB")
    assert all(c > 240 for c in im.getpixel((128, 5)))  # top band: white border
    r, g, b = im.getpixel((130, 128))
    assert r > 150 and g < 80  # middle: the red image


def test_resize_only_if_bigger():
    p = resize.process(_img("JPEG", (40, 30)), cfg(resize_mode="keep_ratio", resize_only_if_bigger=True))
    assert (p.width, p.height) == (40, 30)
    p = resize.process(_img("JPEG", (1024, 768)), cfg(resize_mode="keep_ratio", resize_only_if_bigger=True))
    assert (p.width, p.height) == (341, 256)


def test_jpeg_downscale_uses_reduced_scale_decode(monkeypatch):
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = real(self, mode, size)
        calls.append((size, self.size))
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    p = resize.process(_img("JPEG", (2048, 1536)), cfg(resize_mode="border", image_size=256))
    assert calls and calls[0][1] == (256, 192)  # decoded at 1/8 scale: no resize left to do
    assert (p.width, p.height) == (256, 256)


@pytest.mark.parametrize(
    "kw,data,reason",
    [
        ({"min_image_size": 100}, _img("JPEG", (40, 30)), "image too small"),
        ({"max_image_area": 1000}, _img("JPEG", (40, 30)), "image area too large"),
        ({"max_aspect_ratio": 2.0}, _img("JPEG", (300, 900)), "aspect ratio too large"),
        ({}, ASSETS["bomb.png"][1], "decompression bomb"),
        ({}, ASSETS["hugebomb.png"][1], "decompression bomb"),
    ],
    ids=["min_size", "max_area", "aspect", "bomb", "hugebomb"],
)
def test_rejections_never_decode(monkeypatch, kw, data, reason):
    def boom(self):
        raise AssertionError("decoded an image that is rejected")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(resize.ImageError, match=reason):
        resize.process(data, cfg(**kw))


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"<html></html>", "not a decodable image"),
        (ASSETS["trunc.jpg"][1], "decode failed"),
        (b"", "not a decodable"),
    ],
    ids=["html", "truncated", "empty"],
)
def test_bad_images(data, reason):
    with pytest.raises(resize.ImageError, match=reason):
        resize.process(data, cfg())


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats_and_alpha(fmt, pil):
    p = resize.process(
        ASSETS["alpha.png"][1], cfg(encode_format=fmt, encode_quality=80 if fmt != "png" else 3)
    )
    im = Image.open(io.BytesIO(p.data))
    assert im.format == pil and im.mode == "RGB" and im.size == (256, 256)


def test_skip_reencode_keeps_original_bytes():
    data = _img("JPEG", (320, 240))
    p = resize.process(data, cfg(resize_mode="no", skip_reencode=True))
    assert p.data == data
    p = resize.process(data, cfg(resize_mode="no"))
    assert p.data != data  # re-encoded without the flag


def test_quality_changes_size():
    data = _img("JPEG", (1024, 768))
    lo = resize.process(data, cfg(encode_quality=10))
    hi = resize.process(data, cfg(encode_quality=100))
    assert len(lo.data) < len(hi.data)


def test_exif_extracted_and_orientation_applied():
    p = resize.process(ASSETS["exif.jpg"][1], cfg(extract_exif=True))
    assert json.loads(p.exif)["Make"] == "ClipsearchCam"
    im = Image.new("RGB", (400, 200), "red")
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=ex.tobytes())
    p = resize.process(buf.getvalue(), cfg(resize_mode="keep_ratio_largest"))
    assert (p.width, p.height) == (128, 256)


def test_transparency_is_flattened_on_white():
    im = Image.new("RGBA", (509, 509), (0, 0, 0, 0))  # fully transparent black
    im.paste((0, 0, 255, 255), (101, 101, 399, 399))  # an opaque blue square, edges off the pixel grid
    buf = io.BytesIO()
    im.save(buf, "PNG")
    p = resize.process(buf.getvalue(), cfg(encode_format="png"))
    out = Image.open(io.BytesIO(p.data))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((128, 128)) == (0, 0, 255)
    # blue over white keeps blue at 255 everywhere; a straight-alpha resize would darken the edges
    assert out.getchannel("B").getextrema()[0] >= 250
