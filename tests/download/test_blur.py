"""Face blurring (--bbox-col): box parsing, the kernels, the windowed blur against a plain whole-image
one, and where the blur lands under every resize mode, EXIF orientation and --skip-reencode."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipsearch.download import blur, resize
from clipsearch.download.config import DownloadConfig


def cfg(**kw) -> DownloadConfig:
    kw.setdefault("encode_format", "png")  # lossless: differences are the blur's alone
    return DownloadConfig(url_list="u.parquet", output_folder="o", **kw)


def checkerboard(w: int, h: int, cell: int, fmt: str = "PNG", **save) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    board = (((x // cell) + (y // cell)) % 2 * 200 + 30).astype(np.uint8)
    rgb = np.stack([board, 255 - board, np.full_like(board, 90)], axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **save)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def detail(region: np.ndarray) -> float:
    """Texture left in a region: the mean over channels of the pixel standard deviation."""
    return float(region.std(axis=(0, 1)).mean())


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "value,boxes",
    [
        (None, ()),
        ([], ()),
        ("", ()),
        ("null", ()),
        ([[0.1, 0.2, 0.3, 0.4]], ((0.1, 0.2, 0.3, 0.4),)),
        ("[[0, 0, 1, 1], [0.5, 0.5, 0.5, 0.6]]", ((0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.5, 0.6))),
        (np.array([[0.1, 0.2, 0.3, 0.4]]), ((0.1, 0.2, 0.3, 0.4),)),
        ([[1.0000001, 0, 1.0000001, 1]], ((1.0, 0.0, 1.0, 1.0),)),  # float rounding is tolerated
    ],
)
def test_parse_boxes(value, boxes):
    got = blur.parse_boxes(value)
    assert len(got) == len(boxes)
    for a, b in zip(got, boxes, strict=True):
        assert a == pytest.approx(b)


@pytest.mark.parametrize(
    "value,reason",
    [
        (0.5, "must be a list"),
        ({"x0": 0.1}, "must be a list"),
        ("not json", "not a JSON list"),
        ([0.1, 0.2, 0.3, 0.4], "is not [x0, y0, x1, y1]"),  # a flat box, not a list of boxes
        ([[0.1, 0.2, 0.3]], "is not [x0, y0, x1, y1]"),
        ([[0.1, 0.2, 0.3, 0.4, 0.9]], "is not [x0, y0, x1, y1]"),
        ([[0.1, "a", 0.3, 0.4]], "non-numeric"),
        ([[0.1, True, 0.3, 0.4]], "non-numeric"),
        ([[0.1, float("nan"), 0.3, 0.4]], "NaN"),
        ([[0.1, 0.2, math.inf, 0.4]], "NaN or infinite"),
        ([[0.1, 0.2, 1.3, 0.4]], "outside [0, 1]"),
        ([[-0.2, 0.2, 0.3, 0.4]], "outside [0, 1]"),
        ([[10, 20, 30, 40]], "outside [0, 1]"),  # pixel boxes are not relative boxes
        ([[0.5, 0.2, 0.3, 0.4]], "x1 < x0"),
        ([[0.1, 0.2, 0.3, 0.4], [0.1, 0.6, 0.3, 0.4]], "bbox 1"),
    ],
)
def test_malformed_boxes_are_refused_with_the_reason(value, reason):
    with pytest.raises(blur.BoxError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        blur.parse_boxes(value)


# ---------------------------------------------------------------- the kernels and the windowed blur


def test_kernels():
    # img2dataset 1.47: size 2 ceil(0.1 D) + 1, sigma from the size as OpenCV derives it
    k = blur.kernel_for(100, "img2dataset-1.47")
    assert len(k) == 21
    x = np.arange(21) - 10
    ref = np.exp(-(x**2) / (2 * (0.3 * 9 + 0.8) ** 2))
    np.testing.assert_allclose(k, ref / ref.sum())
    assert blur.kernel_for(30, "img2dataset-1.47").tolist() == [0.03125, 0.109375, 0.21875, 0.28125] + [
        0.21875,
        0.109375,
        0.03125,
    ]
    assert len(blur.kernel_for(0, "img2dataset-1.47")) == 3
    # datacomp: sigma 0.1 D, radius 4 sigma
    k = blur.kernel_for(100, "datacomp")
    assert len(k) == 81 and k.sum() == pytest.approx(1)
    x = np.arange(81) - 40
    np.testing.assert_allclose(k, np.exp(-(x**2) / 200) / np.exp(-(x**2) / 200).sum())
    assert blur.kernel_for(0, "datacomp").tolist() == [1.0]


def _reflect(i: int, n: int) -> int:
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * n - 2 - i
    return i


def reference_blur(arr: np.ndarray, boxes, strength: str) -> np.ndarray:
    """The plain definition, over the whole image: mask, blur image and mask, blend."""
    h, w = arr.shape[:2]
    pboxes, longest = blur.pixel_boxes(boxes, w, h)
    k = blur.kernel_for(longest, strength)
    r = len(k) // 2
    img = arr.astype(np.float64)
    mask = np.zeros((h, w))
    for x0, y0, x1, y1 in pboxes:
        mask[y0:y1, x0:x1] = 1

    def conv(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        out = np.zeros_like(a)
        for t in range(-r, r + 1):
            idx = [_reflect(i + t, n) for i in range(n)]
            out += k[t + r] * np.take(a, idx, axis=axis)
        return out

    bi = conv(conv(img, 0), 1)
    bm = conv(conv(mask, 0), 1)[:, :, None]
    return np.clip(np.rint(img * (1 - bm) + bi * bm), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("strength", blur.STRENGTHS)
def test_windowed_blur_equals_the_whole_image_definition(strength):
    rng = np.random.default_rng(7)
    for _ in range(12):
        h, w = rng.integers(8, 90, 2)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        boxes = []
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.random(2) * 0.9
            bw, bh = rng.random(2) * (1 - np.array([x0, y0]))
            boxes.append((x0, y0, x0 + bw, y0 + bh))
        got = blur.blur_array(arr, boxes, strength).astype(int)
        want = reference_blur(arr, boxes, strength).astype(int)
        diff = np.abs(got - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 vs float64 rounding only


def test_nothing_to_blur_returns_the_image():
    arr = np.zeros((10, 10, 3), np.uint8)
    assert blur.blur_array(arr, ()) is arr
    assert blur.blur_array(arr, [(0.5, 0.5, 0.5, 0.5)]) is arr  # an empty box masks nothing


# ---------------------------------------------------------------- where the blur lands


def expected_window(ow, oh, c: DownloadConfig, box) -> tuple[int, int, int, int]:
    """The output rectangle the blur may touch: the grown box plus one kernel radius, on the resized
    image, shifted by the padding or the crop."""
    size = resize.target_size(ow, oh, c) or (ow, oh)
    (pb,), longest = blur.pixel_boxes([box], *size)
    r = len(blur.kernel_for(longest, c.blur_strength)) // 2
    s = c.image_size
    dx = dy = 0
    if c.resize_mode == "border":
        dx, dy = (s - size[0]) // 2, (s - size[1]) // 2
    elif c.resize_mode == "center_crop":
        dx, dy = -((size[0] - s) // 2), -((size[1] - s) // 2)
    return pb[0] - r + dx, pb[1] - r + dy, pb[2] + r + dx, pb[3] + r + dy


@pytest.mark.parametrize("strength", blur.STRENGTHS)
@pytest.mark.parametrize("mode", ["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"])
@pytest.mark.parametrize("src", [(800, 600), (450, 900)])
def test_blur_lands_on_the_box_under_every_resize_mode(mode, src, strength):
    ow, oh = src
    data = checkerboard(ow, oh, cell=ow // 40)
    box = (0.55, 0.3, 0.8, 0.55)
    c = cfg(resize_mode=mode, blur_strength=strength)
    plain = decode(resize.process(data, c).data)
    blurred_p = resize.process(data, c, (box,))
    blurred = decode(blurred_p.data)
    assert blurred.shape == plain.shape
    changed = np.abs(blurred - plain).max(axis=2) > 0
    x0, y0, x1, y1 = expected_window(ow, oh, c, box)
    outside = changed.copy()
    outside[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = False
    assert not outside.any(), "the blur leaked outside the box's window"
    # the box itself: its checkerboard is smoothed away (datacomp) or clearly weakened (1.47)
    size = resize.target_size(ow, oh, c) or (ow, oh)
    (pb,), _ = blur.pixel_boxes([box], *size)
    gx0, gy0, gx1, gy1 = expected_window(ow, oh, c, box)
    r = (gx1 - gx0 - (pb[2] - pb[0])) // 2
    cx0, cy0, cx1, cy1 = gx0 + r, gy0 + r, gx1 - r, gy1 - r  # the grown box in output coordinates
    inner = (
        slice(cy0 + (cy1 - cy0) // 4, cy1 - (cy1 - cy0) // 4),
        slice(cx0 + (cx1 - cx0) // 4, cx1 - (cx1 - cx0) // 4),
    )
    before, after = detail(plain[inner]), detail(blurred[inner])
    assert after < (0.15 if strength == "datacomp" else 0.8) * before


def test_skip_reencode_never_keeps_the_bytes_of_a_sample_with_boxes():
    data = checkerboard(300, 200, cell=10, fmt="JPEG", quality=90)
    c = DownloadConfig(url_list="u.parquet", output_folder="o", resize_mode="no", skip_reencode=True)
    assert resize.process(data, c).data == data  # no boxes: the original bytes
    p = resize.process(data, c, ((0.1, 0.1, 0.5, 0.6),))
    assert p.data != data and (p.width, p.height) == (300, 200)
    diff = np.abs(decode(p.data) - decode(data))
    # inside the box: blurred; far from it: only the JPEG re-encode's noise
    assert diff[40:100, 50:130].mean() > 4 * diff[185:, 250:].mean()
    # and --disable-all-reencoding too
    c = DownloadConfig(url_list="u.parquet", output_folder="o", disable_all_reencoding=True)
    assert resize.process(data, c).data == data
    p = resize.process(data, c, ((0.1, 0.1, 0.5, 0.6),))
    assert p.data != data and np.abs(decode(p.data) - decode(data))[40:100, 50:130].mean() > 20


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_boxes_follow_the_exif_orientation(orientation):
    """Boxes are relative to the stored pixel grid (what img2dataset and the DataComp detector saw); the
    image is stored upright, so the blur must land on the same content after the turn."""
    raw = np.full((200, 300, 3), 128, np.uint8)
    y, x = np.mgrid[0:200, 0:300]
    raw[((x // 6 + y // 6) % 2 == 0)] = 20  # texture everywhere
    box = (0.1, 0.15, 0.35, 0.5)  # top-left region of the stored grid
    ex = Image.Exif()
    ex[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, "PNG", exif=ex.tobytes())
    c = cfg(resize_mode="no")
    out = decode(resize.process(buf.getvalue(), c, (box,)).data)
    # blur on the stored grid, then turn the result upright the way Pillow does: must agree
    expect = Image.fromarray(blur.blur_array(raw, (box,), c.blur_strength))
    turned = np.asarray(ImageOps.exif_transpose(_with_orientation(expect, orientation))).astype(int)
    assert out.shape == turned.shape
    diff = np.abs(out - turned)
    assert diff.mean() < 0.5, diff.mean()  # one-pixel rounding of box edges at most


def _with_orientation(img: Image.Image, orientation: int) -> Image.Image:
    ex = Image.Exif()
    ex[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=ex.tobytes())
    return Image.open(io.BytesIO(buf.getvalue()))


def test_blur_strengths_differ_in_what_survives():
    """The datacomp kernel leaves far less of a face-sized pattern than 1.47's."""
    data = checkerboard(400, 400, cell=8)
    box = ((0.3, 0.3, 0.6, 0.6),)
    res = {}
    for s in blur.STRENGTHS:
        c = cfg(resize_mode="no", blur_strength=s)
        res[s] = detail(decode(resize.process(data, c, box).data)[150:210, 150:210])
    plain = detail(decode(data)[150:210, 150:210])
    assert res["datacomp"] < 0.02 * plain < res["img2dataset-1.47"]
