"""The embedded sample generator: deterministic, varied, decodable, captions that match attributes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipsearch.demo.sample import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    generate_sample,
    make_image,
    sample_attributes,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, generate_sample(out, 60, seed=3)


def test_public_tuples():
    assert len(COLORS) >= 8 and len(SHAPES) >= 6 and len(BACKGROUNDS) >= 6
    assert {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"} <= set(COLORS)
    assert {"circle", "square", "triangle", "star"} <= set(SHAPES)


def test_rows_files_and_jsonl(sample):
    out, rows = sample
    assert len(rows) == 60
    assert [r["file"] for r in rows] == [f"img_{i:05d}.jpg" for i in range(60)]
    on_disk = [json.loads(line) for line in (out / "sample.jsonl").read_text().splitlines()]
    assert on_disk == rows
    assert not list(out.glob(".*tmp"))


def test_captions_name_the_attributes(sample):
    _, rows = sample
    for r in rows:
        assert r["color"] in COLORS and r["shape"] in SHAPES and r["background"] in BACKGROUNDS
        words = r["caption"].split()
        assert r["color"] in words
        assert r["shape"] in words
    # a few templates, not one
    assert len({r["caption"].split(r["color"])[0] for r in rows}) >= 3
    assert not any(" a orange" in r["caption"] or r["caption"].startswith("a orange") for r in rows)


def test_images_decode_with_varied_sizes(sample):
    out, rows = sample
    sizes = set()
    for r in rows:
        with Image.open(out / r["file"]) as im:
            im.load()
            assert im.mode == "RGB" and im.format == "JPEG"
            w, h = im.size
            assert 200 <= w <= 640 and 200 <= h <= 640
            sizes.add(im.size)
    assert len(sizes) > 20
    assert len({w > h for w, h in sizes}) == 2  # landscape and portrait


def test_deterministic_and_prefix_stable(tmp_path, sample):
    out, rows = sample
    rows2 = generate_sample(tmp_path, 12, seed=3)
    assert rows2 == rows[:12]
    for r in rows2:
        assert (tmp_path / r["file"]).read_bytes() == (out / r["file"]).read_bytes()
    other = generate_sample(tmp_path / "other", 12, seed=4)
    assert [r["caption"] for r in other] != [r["caption"] for r in rows2]


def test_colour_shape_pairs_are_balanced():
    n = len(COLORS) * len(SHAPES)
    pairs = [sample_attributes(i, seed=1)[:2] for i in range(2 * n)]
    assert len(set(pairs[:n])) == n and len(set(pairs[n:])) == n


def test_make_image_texture_and_object():
    rng = np.random.default_rng(0)
    img = make_image("red", "circle", "grass", rng, size=(300, 200))
    assert img.size == (300, 200)
    a = np.asarray(img).astype(int)
    # textured, not flat: the background varies
    assert a[:20, :20].std() > 4
    # the centre is red-ish, the corners are green-ish
    centre = a[90:110, 140:160].reshape(-1, 3).mean(0)
    corner = a[:20, :20].reshape(-1, 3).mean(0)
    assert centre[0] > centre[1] + 60 and centre[0] > centre[2] + 60
    assert corner[1] > corner[0]


@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("webp", "webp")])
def test_other_formats(tmp_path, fmt, ext):
    rows = generate_sample(tmp_path, 2, seed=0, image_format=fmt)
    assert rows[0]["file"] == f"img_00000.{ext}"
    with Image.open(tmp_path / rows[0]["file"]) as im:
        im.load()


def test_bad_arguments(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="colour"):
        make_image("mauve", "circle", "grass", rng)
    with pytest.raises(ValueError, match="shape"):
        make_image("red", "blob", "grass", rng)
    with pytest.raises(ValueError, match="background"):
        make_image("red", "circle", "mars", rng)
    with pytest.raises(ValueError, match="format"):
        generate_sample(tmp_path, 1, image_format="bmp")


def test_quality_attribute_is_visible_and_leaves_sharp_images_alone(tmp_path):
    import numpy as np
    from PIL import Image

    from clipsearch.demo.sample import generate_sample

    plain = generate_sample(tmp_path / "a", 60, seed=3, image_format="png")
    mixed = generate_sample(tmp_path / "b", 60, seed=3, image_format="png", degraded=0.5)
    assert {r["quality"] for r in plain} == {"sharp"}
    counts = {q: sum(r["quality"] == q for r in mixed) for q in ("sharp", "blurred", "noisy")}
    assert all(10 <= n <= 50 for n in counts.values()), counts

    def detail(path):  # mean absolute difference between neighbouring pixels
        a = np.asarray(Image.open(path).convert("L"), np.float32)
        return float(np.abs(np.diff(a, axis=1)).mean())

    for p, m in zip(plain, mixed, strict=True):
        a, b = tmp_path / "a" / p["file"], tmp_path / "b" / m["file"]
        if m["quality"] == "sharp":
            assert a.read_bytes() == b.read_bytes()
        elif m["quality"] == "blurred":
            assert detail(b) < 0.6 * detail(a)
        else:
            assert detail(b) > 1.3 * detail(a)
