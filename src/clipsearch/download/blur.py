"""Blur boxes of an image (face blurring for `--bbox-col`), with img2dataset's geometry.

A sample's boxes are relative `[x0, y0, x1, y1]` in [0, 1] of the original image. They are applied to the
image once it is resized and before it is padded (`border`) or cropped (`center_crop`), like img2dataset:
each box is scaled to pixels (truncated), grown by 10% of its longer side on every side, and clipped to
the image; the union of the grown boxes is the mask. Both the image and the mask are blurred with one
Gaussian whose size follows the longest box side D over the image's boxes, and the image becomes
`img * (1 - blurred_mask) + blurred_img * blurred_mask`, a blur that fades out at the box edges.

Two kernels (`--blur-strength`):
- `datacomp` (default): sigma = 0.1 D, kernel radius 4 sigma: the ImageNet face-obfuscation code's
  choice, and the kernel of img2dataset's blurrer as it came with DataComp (1.47 no longer applies it).
- `img2dataset-1.47`: the kernel img2dataset 1.47 actually applies. It sizes the kernel as 2 ceil(0.1 D) + 1
  but lets OpenCV derive sigma from that size (0.3 ((k - 1) / 2 - 1) + 0.8, about 0.03 D + 0.5, with
  OpenCV's fixed tables up to 9 taps), a weaker blur; for a byte-level match with 1.47's outputs.

The work is limited to the boxes' neighbourhood: the blurred mask is zero farther than one kernel radius
from the grown boxes, so only that window changes, and computing it needs one more radius of input. Each
1-D pass is one matrix product whose matrix also holds the image-edge reflection (OpenCV's default
border, reflect-101), so the result equals a whole-image blur.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Iterator, Sequence

import numpy as np

Box = tuple[float, float, float, float]

STRENGTHS = ("datacomp", "img2dataset-1.47")
#: relative coordinates may overshoot [0, 1] by this much (float rounding in whoever wrote the list)
_TOLERANCE = 1e-6
#: OpenCV's fixed kernels for sigma <= 0 and an odd size up to 9 (cv2.getGaussianKernel)
_CV_SMALL = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
    9: [4 / 256, 13 / 256, 30 / 256, 51 / 256, 60 / 256, 51 / 256, 30 / 256, 13 / 256, 4 / 256],
}


@contextlib.contextmanager
def single_threaded_blas(enabled: bool = True) -> Iterator[None]:
    """One BLAS thread while a shard blurs: the decode threads already fill the cores, and a BLAS that
    spawns one thread per core inside each of them would only fight over the CPU."""
    if not enabled:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


class BoxError(ValueError):
    """The sample's boxes are malformed; the message is its error_message."""


def parse_boxes(value: object) -> tuple[Box, ...]:
    """A sample's bbox cell as a tuple of boxes; () for none (null, empty list or blank text).

    Accepts a list of [x0, y0, x1, y1] lists (parquet/JSON) or the same as JSON text (CSV). Raises
    BoxError for anything else, so that a sample is never stored unblurred because its boxes were
    misread."""
    if value is None:
        return ()
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BoxError("bbox is not a JSON list of [x0, y0, x1, y1] boxes") from None
        if value is None:
            return ()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise BoxError(f"bbox must be a list of [x0, y0, x1, y1] boxes, got {type(value).__name__}")
    boxes = []
    for i, b in enumerate(value):
        if isinstance(b, np.ndarray):
            b = b.tolist()
        if not isinstance(b, list | tuple) or len(b) != 4:
            raise BoxError(f"bbox {i} is not [x0, y0, x1, y1]: {_short(b)}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) for v in b):
            raise BoxError(f"bbox {i} has a non-numeric value: {_short(b)}")
        x0, y0, x1, y1 = (float(v) for v in b)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise BoxError(f"bbox {i} has a NaN or infinite value: {_short(b)}")
        if not all(-_TOLERANCE <= v <= 1 + _TOLERANCE for v in (x0, y0, x1, y1)):
            raise BoxError(f"bbox {i} is outside [0, 1] (relative coordinates expected): {_short(b)}")
        if x1 < x0 or y1 < y0:
            raise BoxError(f"bbox {i} has x1 < x0 or y1 < y0: {_short(b)}")
        boxes.append(
            (min(max(x0, 0.0), 1.0), min(max(y0, 0.0), 1.0), min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0))
        )
    return tuple(boxes)


def _short(v: object) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def orient_boxes(boxes: Sequence[Box], orientation: int) -> tuple[Box, ...]:
    """Boxes given on the stored pixel grid, mapped onto the image turned upright by its EXIF
    orientation (2-8), as `ImageOps.exif_transpose` turns it."""
    maps = {
        2: lambda x, y: (1 - x, y),
        3: lambda x, y: (1 - x, 1 - y),
        4: lambda x, y: (x, 1 - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (1 - y, x),
        7: lambda x, y: (1 - y, 1 - x),
        8: lambda x, y: (y, 1 - x),
    }
    f = maps.get(orientation)
    if f is None:
        return tuple(boxes)
    out = []
    for x0, y0, x1, y1 in boxes:
        (ax, ay), (bx, by) = f(x0, y0), f(x1, y1)
        out.append((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return tuple(out)


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """OpenCV's getGaussianKernel: sigma <= 0 derives sigma from the size (fixed tables up to 9)."""
    if sigma <= 0:
        if ksize in _CV_SMALL:
            return np.array(_CV_SMALL[ksize])
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = np.arange(ksize) - (ksize - 1) / 2
    w = np.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


def kernel_for(max_side: int, strength: str) -> np.ndarray:
    """The 1-D kernel for boxes whose longest side (in pixels) is `max_side`."""
    sigma = 0.1 * max_side
    if strength == "img2dataset-1.47":
        return gaussian_kernel(max(3, 2 * math.ceil(sigma) + 1), 0.0)
    if strength == "datacomp":
        ksize = int(2 * math.ceil(4 * sigma)) + 1
        return gaussian_kernel(ksize, sigma) if sigma > 0 else np.ones(1)
    raise ValueError(f"unknown blur strength {strength!r}")


def pixel_boxes(boxes: Sequence[Box], width: int, height: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """The grown, clipped pixel boxes (x0, y0, x1, y1; ends exclusive) and the longest box side D."""
    out, longest = [], 0
    for bx0, by0, bx1, by1 in boxes:
        x0, y0, x1, y1 = int(bx0 * width), int(by0 * height), int(bx1 * width), int(by1 * height)
        side = max(x1 - x0, y1 - y0)
        longest = max(longest, side)
        grow = 0.1 * side
        x0, y0, x1, y1 = int(x0 - grow), int(y0 - grow), int(x1 + grow), int(y1 + grow)
        out.append(
            (
                min(max(x0, 0), width - 1),
                min(max(y0, 0), height - 1),
                min(max(x1, 0), width - 1),
                min(max(y1, 0), height - 1),
            )
        )
    return out, longest


def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * n - 2
    j = np.mod(idx, period)
    return np.where(j >= n, period - j, j)


def _pass_matrix(first: int, stop: int, n: int, kernel: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The matrix taking input samples [lo, hi) to the blurred outputs [first, stop) of a length-n
    signal, reflect-101 at its ends; returns (matrix, lo, hi)."""
    r = (len(kernel) - 1) // 2
    src = _reflect101(np.arange(first, stop)[:, None] + np.arange(-r, r + 1)[None, :], n)
    lo, hi = int(src.min()), int(src.max()) + 1
    rows = stop - first
    flat = (np.arange(rows)[:, None] * (hi - lo) + (src - lo)).ravel()
    weights = np.broadcast_to(kernel, src.shape).ravel()
    # taps that reflect onto the same sample add up (bincount accumulates)
    m = np.bincount(flat, weights=weights, minlength=rows * (hi - lo)).astype(np.float32)
    return m.reshape(rows, hi - lo), lo, hi


def _banded(m: np.ndarray, x: np.ndarray, right: bool = False) -> np.ndarray:
    """`m @ x` (or `x @ m.T` when `right`) for a band matrix `m` (n_out x n_in), in blocks of its rows,
    each multiplied by only the part of `x` its band reaches: a wide window does not pay for the zeros."""
    n_out, n_in = m.shape
    step = 64
    if n_in <= 2 * step:
        return x @ m.T if right else m @ x
    out = np.empty((x.shape[0], n_out) if right else (n_out, x.shape[1]), np.float32)
    for i in range(0, n_out, step):
        block = m[i : i + step]
        cols = np.flatnonzero(block.any(axis=0))
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        if right:
            out[:, i : i + step] = x[:, lo:hi] @ block[:, lo:hi].T
        else:
            out[i : i + step] = block[:, lo:hi] @ x[lo:hi]
    return out


def _clusters(boxes: list[tuple[int, int, int, int]], r: int) -> list[list[tuple[int, int, int, int]]]:
    """Boxes grouped so that the windows (box + one radius) of different groups do not meet. The
    blurred mask of a group is zero outside its window, so the groups are blurred apart, exactly."""
    groups = [[b] for b in boxes]

    def window(g: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
        return (
            min(b[0] for b in g) - r,
            min(b[1] for b in g) - r,
            max(b[2] for b in g) + r,
            max(b[3] for b in g) + r,
        )

    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                a, b = window(groups[i]), window(groups[j])
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    groups[i] += groups.pop(j)
                    merged = True
                    break
            if merged:
                break
    return groups


def _blur_window(
    arr: np.ndarray, out: np.ndarray, group: list[tuple[int, int, int, int]], kernel: np.ndarray
) -> None:
    """Blur one group of boxes of `arr` (H x W x C) into `out`, inside the group's window only.

    The window is processed planar (rows, channels, columns), so that each 1-D pass is a single matrix
    product: the horizontal one `(H*C x W_in) @ (W_in x W_out)`, the vertical one
    `(H_out x H_in) @ (H_in x C*W_out)`."""
    h, w, c = arr.shape
    r = (len(kernel) - 1) // 2
    # output window: the group's boxes grown by one radius (the blurred mask is 0 beyond it)
    ox0, oy0 = max(0, min(b[0] for b in group) - r), max(0, min(b[1] for b in group) - r)
    ox1, oy1 = min(w, max(b[2] for b in group) + r), min(h, max(b[3] for b in group) + r)
    ay, iy0, iy1 = _pass_matrix(oy0, oy1, h, kernel)
    ax, ix0, ix1 = _pass_matrix(ox0, ox1, w, kernel)
    hi_, wi_, ho_, wo_ = iy1 - iy0, ix1 - ix0, oy1 - oy0, ox1 - ox0
    single = len(group) == 1  # one rectangle: its blurred mask is the outer product of two 1-D blurs
    n = c if single else c + 1
    planes = np.empty((hi_, n, wi_), np.float32)
    planes[:, :c] = arr[iy0:iy1, ix0:ix1].transpose(0, 2, 1)
    if not single:
        planes[:, c] = 0.0
        for x0, y0, x1, y1 in group:
            planes[y0 - iy0 : y1 - iy0, c, x0 - ix0 : x1 - ix0] = 1.0
    tmp = _banded(ax, planes.reshape(hi_ * n, wi_), right=True)  # horizontal: (H_in*n, W_out)
    blurred = _banded(ay, tmp.reshape(hi_, n * wo_)).reshape(ho_, n, wo_)  # vertical
    if single:
        x0, y0, x1, y1 = group[0]
        my = np.zeros(hi_, np.float32)
        my[y0 - iy0 : y1 - iy0] = 1.0
        mx = np.zeros(wi_, np.float32)
        mx[x0 - ix0 : x1 - ix0] = 1.0
        mask = np.outer(ay @ my, ax @ mx)[:, None, :]
    else:
        mask = blurred[:, c : c + 1]
    mixed = blurred[:, :c]
    orig = arr[oy0:oy1, ox0:ox1].transpose(0, 2, 1)
    mixed -= orig  # in place: img + (blurred - img) * mask
    mixed *= mask
    mixed += orig
    np.rint(mixed, out=mixed)
    np.clip(mixed, 0, 255, out=mixed)
    out[oy0:oy1, ox0:ox1] = mixed.transpose(0, 2, 1)


def blur_array(arr: np.ndarray, boxes: Sequence[Box], strength: str = "datacomp") -> np.ndarray:
    """Blur `boxes` of an H x W (x C) uint8 array; returns a new array (the input when nothing changes)."""
    if not boxes:
        return arr
    h, w = arr.shape[:2]
    pboxes, longest = pixel_boxes(boxes, w, h)
    kernel = kernel_for(longest, strength)
    r = (len(kernel) - 1) // 2
    live = [(x0, y0, x1, y1) for x0, y0, x1, y1 in pboxes if x1 > x0 and y1 > y0]
    if not live or r == 0:  # an empty mask, or a one-tap kernel: the blend gives the image back
        return arr
    src = arr if arr.ndim == 3 else arr[:, :, None]
    out = src.copy()
    for group in _clusters(live, r):  # the blurred image always comes from the original pixels
        _blur_window(src, out, group, kernel)
    return out if arr.ndim == 3 else out[:, :, 0]
