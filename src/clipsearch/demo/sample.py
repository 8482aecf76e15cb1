"""Seeded generator of photo-like sample images with captions, for demos and tests (no internet).

Each image is one coloured object (a circle, a star, ...) on a procedural texture (grass, bricks,
water, ...), with varied object size, position, rotation, lighting, noise and image size. Its caption
names the three attributes, e.g. ``"a photo of a red circle on grass"``.

Colours and shapes are balanced: every block of ``len(COLORS) * len(SHAPES)`` consecutive images holds
each colour+shape pair exactly once (in a seeded order), so any ``n`` that is a multiple of 48 has the
same number of images per pair. The background is drawn at random. Image ``i`` depends only on
``(seed, i)``, so a larger ``n`` extends a smaller one.

The textures are built from low-resolution random grids upscaled by PIL (value noise) and combined
with vectorised numpy, so thousands of images take seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

#: object colours and their base RGB
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 30),
    "green": (35, 165, 45),
    "blue": (30, 65, 205),
    "yellow": (240, 212, 35),
    "purple": (128, 45, 170),
    "orange": (245, 128, 20),
    "white": (246, 246, 246),
    "black": (22, 22, 22),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
BACKGROUNDS: tuple[str, ...] = ("grass", "sand", "water", "wood", "brick", "sky", "snow")

#: how a caption names each background
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass", "on green grass"),
    "sand": ("on sand", "on the sand", "on a sandy beach"),
    "water": ("on water", "on the water", "floating on water"),
    "wood": ("on wood", "on a wooden table", "on wooden boards"),
    "brick": ("on a brick wall", "on bricks", "against a brick wall"),
    "sky": ("in the sky", "against a blue sky", "in the sky with clouds"),
    "snow": ("on snow", "in the snow", "on white snow"),
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a} {color} {shape} {bg}",
    "a photo of {a} {color} {shape} {bg}",
    "a picture of {a} {color} {shape} {bg}",
    "{a} {color} {shape} shape {bg}",
    "an image of {a} {color} {shape} {bg}",
    "{color} {shape} {bg}",
)

_TEXTURE_MAX = 288

_FORMATS = {"jpg": ("JPEG", "jpg"), "jpeg": ("JPEG", "jpg"), "png": ("PNG", "png"), "webp": ("WEBP", "webp")}


# --------------------------------------------------------------------------- textures


def _noise(
    rng: np.random.Generator, w: int, h: int, cell_x: float, cell_y: float | None = None
) -> np.ndarray:
    """Value noise in [0, 1] of shape (h, w): a random grid with cells of ~cell px, upscaled bilinearly."""
    cell_y = cell_x if cell_y is None else cell_y
    gw = max(2, int(math.ceil(w / cell_x)) + 1)
    gh = max(2, int(math.ceil(h / cell_y)) + 1)
    grid = Image.fromarray(rng.integers(0, 256, size=(gh, gw), dtype=np.uint8), "L")
    up = grid.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32) * (1.0 / 255.0)


def _fractal(rng: np.random.Generator, w: int, h: int, cell: float, octaves: int = 3, stretch=(1.0, 1.0)):
    """Sum of value-noise octaves (each half the cell size, half the weight), in about [0, 1]."""
    out = np.zeros((h, w), np.float32)
    total = 0.0
    amp = 1.0
    for _ in range(octaves):
        out += amp * _noise(rng, w, h, max(1.0, cell * stretch[0]), max(1.0, cell * stretch[1]))
        total += amp
        amp *= 0.5
        cell *= 0.5
    return out / total


def _mix(a: np.ndarray, c0, c1) -> np.ndarray:
    """Blend two RGB colours by the weight map a (h, w) in [0, 1] -> float (h, w, 3)."""
    c0 = np.asarray(c0, np.float32)
    c1 = np.asarray(c1, np.float32)
    return c0 + a[..., None] * (c1 - c0)


def _grass(rng, w, h, s):
    blades = _fractal(rng, w, h, s * 0.05, 3, stretch=(0.25, 2.5))
    patches = _noise(rng, w, h, s * 0.35)
    img = _mix(np.clip(blades * 1.3 - 0.15, 0, 1), (30, 80, 20), (120, 185, 60))
    return img * (0.75 + 0.4 * patches[..., None])


def _sand(rng, w, h, s):
    fine = _noise(rng, w, h, 1.5)
    yy = np.arange(h, dtype=np.float32)[:, None]
    warp = _fractal(rng, w, h, s * 0.3, 2)
    ripples = 0.5 + 0.5 * np.sin(yy * (2 * np.pi / (s * rng.uniform(0.06, 0.12))) + warp * 8.0)
    img = _mix(0.55 * ripples + 0.45 * fine, (185, 155, 105), (238, 215, 170))
    return img


def _water(rng, w, h, s):
    waves = _fractal(rng, w, h, s * 0.12, 3, stretch=(3.0, 0.35))
    yy = np.arange(h, dtype=np.float32)[:, None]
    depth = yy / max(1, h - 1)
    img = _mix(waves, (20, 60, 115), (70, 140, 195)) * (0.85 + 0.25 * depth[..., None])
    glint = np.clip((waves - 0.68) * 5.0, 0, 1)[..., None]
    return img + glint * 90.0


def _wood(rng, w, h, s):
    xx = np.arange(w, dtype=np.float32)[None, :]
    warp = _fractal(rng, w, h, s * 0.25, 2, stretch=(0.4, 3.0))
    grain = 0.5 + 0.5 * np.sin((xx + warp * s * 0.25) * (2 * np.pi / (s * rng.uniform(0.03, 0.07))))
    fine = _noise(rng, w, h, 2.0, 12.0)
    img = _mix(0.7 * grain + 0.3 * fine, (95, 55, 25), (175, 120, 70))
    planks = max(24, int(s * rng.uniform(0.18, 0.3)))
    seams = ((np.arange(w) + int(rng.integers(planks))) % planks < 2)[None, :, None]
    return np.where(seams, img * 0.45, img)


def _brick(rng, w, h, s):
    bh = max(8, int(s * rng.uniform(0.07, 0.11)))
    bw = int(bh * rng.uniform(2.0, 2.6))
    yy = np.arange(h)[:, None]
    xx = np.arange(w)[None, :]
    row = yy // bh
    shifted = xx + (row % 2) * (bw // 2)
    col = shifted // bw
    mortar = ((yy % bh) < max(1, bh // 7)) | ((shifted % bw) < max(1, bh // 7))
    # per-brick shade from a small random table
    table = rng.uniform(0.75, 1.15, size=(h // bh + 2, w // bw + 3)).astype(np.float32)
    shade = table[row, col]
    fine = _noise(rng, w, h, 2.0)
    brick = np.asarray((150, 62, 42), np.float32) * (shade * (0.85 + 0.3 * fine))[..., None]
    mortar_rgb = _mix(fine, (160, 155, 145), (200, 195, 185))
    return np.where(mortar[..., None], mortar_rgb, brick)


def _sky(rng, w, h, s):
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    base = _mix(np.broadcast_to(yy, (h, w)), (55, 115, 205), (165, 205, 240))
    clouds = _fractal(rng, w, h, s * 0.4, 4, stretch=(1.8, 0.8))
    amount = rng.uniform(0.45, 0.65)
    cover = np.clip((clouds - amount) * 4.0, 0, 1)[..., None]
    return base * (1 - cover) + cover * np.asarray((245, 247, 250), np.float32)


def _snow(rng, w, h, s):
    drifts = _fractal(rng, w, h, s * 0.5, 2, stretch=(2.5, 0.6))
    grain = _noise(rng, w, h, 1.5)
    img = _mix(np.clip(0.75 * drifts + 0.25 * grain + 0.15, 0, 1), (170, 185, 210), (252, 253, 255))
    sparkle = (rng.random((h, w), dtype=np.float32) > 0.995)[..., None]
    return np.where(sparkle, 255.0, img)


_TEXTURES = {
    "grass": _grass,
    "sand": _sand,
    "water": _water,
    "wood": _wood,
    "brick": _brick,
    "sky": _sky,
    "snow": _snow,
}


# --------------------------------------------------------------------------- shapes


def _star_points(cx, cy, r_out, r_in, n=5):
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + k * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _heart_points(cx, cy, r, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    k = r / 17.0
    return list(zip((cx + k * x).tolist(), (cy - k * y + r * 0.1).tolist(), strict=True))


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An antialiased 'L' mask of the shape filling about a size x size box."""
    ss = 2  # supersampling factor
    n = size * ss
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    c = n / 2
    r = n * 0.48
    if shape == "circle":
        e = rng.uniform(0.9, 1.0)
        d.ellipse((c - r, c - r * e, c + r, c + r * e), fill=255)
    elif shape == "square":
        q = r * 0.86
        d.rectangle((c - q, c - q, c + q, c + q), fill=255)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c + r * 0.95, c + r * 0.75), (c - r * 0.95, c + r * 0.75)], fill=255)
    elif shape == "star":
        d.polygon(_star_points(c, c + r * 0.08, r, r * rng.uniform(0.38, 0.45)), fill=255)
    elif shape == "cross":
        t = r * rng.uniform(0.30, 0.38)
        d.rectangle((c - t, c - r, c + t, c + r), fill=255)
        d.rectangle((c - r, c - t, c + r, c + t), fill=255)
    elif shape == "heart":
        d.polygon(_heart_points(c, c, r), fill=255)
    else:  # pragma: no cover - guarded by make_image
        raise ValueError(shape)
    return m.resize((size, size), Image.Resampling.BILINEAR)


# --------------------------------------------------------------------------- images


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16, 5 / 4]))
    long_side = int(rng.integers(240, 641))
    if aspect >= 1:
        w, h = long_side, max(200, round(long_side / aspect))
    else:
        w, h = max(200, round(long_side * aspect)), long_side
    return w, h


def make_image(
    color: str,
    shape: str,
    background: str,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """One RGB image of a `color` `shape` on a `background` texture; size is (width, height), random if None."""
    return _render(color, shape, background, rng, size)


def _render(
    color: str,
    shape: str,
    background: str,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
    object_scale: tuple[float, float] = (0.42, 0.72),
    texture: float = 1.0,
) -> Image.Image:
    """make_image, plus knobs the model training uses for easier early examples: the object's size as a
    fraction of the short side, and the texture contrast (0 = flat mean colour, 1 = full)."""
    if color not in COLOR_RGB:
        raise ValueError(f"unknown colour {color!r}; choose one of {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if background not in _TEXTURES:
        raise ValueError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    w, h = _random_size(rng) if size is None else (int(size[0]), int(size[1]))
    if w < 8 or h < 8:
        raise ValueError(f"image size {size} is too small (min 8x8)")
    s = float(min(w, h))

    # the texture is computed at most _TEXTURE_MAX px on the long side, then upscaled (speed)
    k = min(1.0, _TEXTURE_MAX / max(w, h))
    tw, th = max(8, round(w * k)), max(8, round(h * k))
    bg = _TEXTURES[background](rng, tw, th, float(min(tw, th)))
    if texture != 1.0:
        mean = bg.mean(axis=(0, 1), keepdims=True)
        bg = mean + texture * (bg - mean)
    sigma = rng.uniform(0.0, 8.0)  # sensor noise
    if sigma > 0.5:
        bg = bg + ((rng.random((th, tw), dtype=np.float32) - 0.5) * (2.0 * sigma))[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    if (tw, th) != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)

    # object: size, rotation, position (kept near the centre so a centre crop keeps it)
    obj = max(6, int(s * rng.uniform(*object_scale)))
    mask = _shape_mask(shape, obj, rng)
    angle = float(rng.uniform(-20, 20))
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    mw, mh = mask.size
    span_x = max(0.0, min((w - mw) / 2, s * 0.18))
    span_y = max(0.0, min((h - mh) / 2, s * 0.18))
    x0 = int(round((w - mw) / 2 + rng.uniform(-span_x, span_x)))
    y0 = int(round((h - mh) / 2 + rng.uniform(-span_y, span_y)))

    # soft drop shadow
    off = max(1, int(obj * rng.uniform(0.03, 0.07)))
    shadow = mask.filter(ImageFilter.BoxBlur(max(1, obj // 25))).point(lambda v: int(v * 0.45))
    img.paste((0, 0, 0), (x0 + off, y0 + off), shadow)

    # fill: the colour, jittered, lit by a linear gradient, with a little texture
    base = np.asarray(COLOR_RGB[color], np.float32)
    base = base * rng.uniform(0.9, 1.08, size=3).astype(np.float32) + rng.uniform(-12, 12)
    ga = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    grad = ((xx / mw - 0.5) * math.cos(ga) + (yy / mh - 0.5) * math.sin(ga)) * rng.uniform(0.15, 0.4)
    fill = base[None, None, :] * (1.0 + grad[..., None]) + 12.0 * (_noise(rng, mw, mh, 3.0)[..., None] - 0.5)
    fill_img = Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8), "RGB")
    img.paste(fill_img, (x0, y0), mask)

    # global lighting: exposure and colour temperature, as a per-channel lookup table
    gain = rng.uniform(0.8, 1.12) * rng.uniform(0.94, 1.06, size=3)
    ramp = np.arange(256, dtype=np.float64)
    lut = np.clip(np.concatenate([ramp * g for g in gain]), 0, 255).astype(np.uint8)
    return img.point(lut.tolist())


#: the visible quality attribute: degraded images are blurred or carry a coarse grain (sensor noise strong
#: enough to survive the download's and the model's downscaling)
QUALITIES: tuple[str, ...] = ("sharp", "blurred", "noisy")


def sample_quality(i: int, seed: int, degraded: float) -> tuple[str, np.random.Generator]:
    """Image i's quality for a sample whose `degraded` share is blurred or noisy (half each), and the
    generator of its degradation. Independent of the image's own generator, so sharp images stay the same."""
    rng = np.random.default_rng([seed, 3, i])
    u = rng.random()
    if u >= degraded:
        return "sharp", rng
    return ("blurred" if u < degraded / 2 else "noisy"), rng


def degrade(img: Image.Image, quality: str, rng: np.random.Generator) -> Image.Image:
    """Blur (Gaussian, 3-5 % of the short side) or grain (Gaussian noise, sigma 45-70, in cells of ~1 % of the
    short side) an image; a sharp image is returned as it is."""
    w, h = img.size
    s = min(w, h)
    if quality == "blurred":
        return img.filter(ImageFilter.GaussianBlur(radius=s * float(rng.uniform(0.03, 0.05))))
    if quality == "noisy":
        a = np.asarray(img, np.float32)
        cell = max(1, s // 90)
        gh, gw = -(-h // cell), -(-w // cell)
        grain = rng.normal(0.0, float(rng.uniform(45, 70)), (gh, gw, 3)).astype(np.float32)
        grain = grain.repeat(cell, 0).repeat(cell, 1)[:h, :w]
        return Image.fromarray(np.clip(a + grain, 0, 255).astype(np.uint8))
    if quality != "sharp":
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    return img


def make_caption(color: str, shape: str, background: str, rng: np.random.Generator) -> str:
    """A caption naming the three attributes, from a few templates."""
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    phrases = BACKGROUND_PHRASES[background]
    bg = phrases[int(rng.integers(len(phrases)))]
    article = "an" if color[0] in "aeiou" else "a"
    return template.format(a=article, color=color, shape=shape, bg=bg)


def sample_attributes(i: int, seed: int = 0) -> tuple[str, str, str, np.random.Generator]:
    """Attributes of image i of the seeded sample, plus the image's own generator."""
    n_pairs = len(COLORS) * len(SHAPES)
    block, pos = divmod(i, n_pairs)
    order = np.random.default_rng([seed, 1, block]).permutation(n_pairs)
    pair = int(order[pos])
    color, shape = COLORS[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
    rng = np.random.default_rng([seed, 2, i])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return color, shape, background, rng


def generate_sample(
    out_dir: str | Path, n: int, seed: int = 0, image_format: str = "jpg", degraded: float = 0.0
) -> list[dict]:
    """Write n images `img_{i:05d}.<ext>` and `sample.jsonl` into out_dir; return the jsonl rows.

    Each row is ``{"file", "caption", "color", "shape", "background", "quality"}``. A `degraded` share of
    the images is blurred or noisy (`quality`), the others are `sharp`. Deterministic for a seed.
    """
    if not (0.0 <= degraded <= 1.0):
        raise ValueError(f"degraded must be in [0, 1], got {degraded}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fmt = _FORMATS.get(image_format.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"unknown image format {image_format!r}; choose one of jpg, png, webp")
    pil_format, ext = fmt
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i in range(n):
        color, shape, background, rng = sample_attributes(i, seed)
        img = make_image(color, shape, background, rng)
        caption = make_caption(color, shape, background, rng)
        quality, qrng = sample_quality(i, seed, degraded)
        img = degrade(img, quality, qrng)
        name = f"img_{i:05d}.{ext}"
        save_kw = {"quality": 90} if pil_format in ("JPEG", "WEBP") else {}
        tmp = out / f".{name}.tmp"
        img.save(tmp, format=pil_format, **save_kw)
        os.replace(tmp, out / name)
        rows.append(
            {
                "file": name,
                "caption": caption,
                "color": color,
                "shape": shape,
                "background": background,
                "quality": quality,
            }
        )
    tmp = out / ".sample.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out / "sample.jsonl")
    logger.info("generated %d sample images in %s (seed %d)", n, out, seed)
    return rows
