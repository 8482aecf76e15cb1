"""Face blurring (--bbox-col) pixel by pixel against img2dataset 1.47, every resize mode.

    .venv/bin/python benchmarks/download_blur_compare.py [--n 90] [--out results.json]

A generated corpus (photo-like backgrounds, 320-2048 px, eight aspect ratios, JPEG/PNG/RGBA PNG/WebP)
where two images in three carry 1-3 "faces": boxes filled with an identity pattern, band-pass noise at the
scale of facial features (2.5-8 cycles per box), one identity per image. Both tools download the same
URL list from nginx on 127.0.0.1 with the same options, once per resize mode:

- img2dataset 1.47 with --bbox_col, clipsearch with --bbox-col --blur-strength img2dataset-1.47 and
  with the default (datacomp), and both without --bbox-col (what the resizers alone contribute);
- stored images compared key by key: mean absolute difference (MAD, 0-255) and PSNR (pooled MSE) over
  the whole image, and inside the box windows;
- recognisability: each stored face box is matched against the gallery of all identities by
  normalised cross-correlation (top-1 identification rate; chance is 1/n), both against the plain
  gallery and against the gallery blurred the same way (an attacker who knows the blur).

img2dataset runs from its own venv (--i2d-python; `pip install img2dataset==1.47 'numpy<2' 'pyarrow<20'`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from clipsearch.download import blur  # noqa: E402

MODES = ["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"]
SIZE = 256
GALLERY_PX = 64
#: frequency bands, in cycles per face box: face shape and shading; eyes, nose and mouth; fine detail
BANDS = {"coarse 2-4": (2, 4), "features 4-8": (4, 8), "fine 8-16": (8, 16)}


# ---------------------------------------------------------------- corpus


def identity(rng: np.random.Generator, n: int = 64) -> np.ndarray:
    """Zero-mean, unit-std band-pass noise from 2 to 16 cycles per face: every scale of a face."""
    f = np.fft.fft2(rng.standard_normal((n, n)))
    fy, fx = np.fft.fftfreq(n)[:, None] * n, np.fft.fftfreq(n)[None, :] * n
    r = np.hypot(fx, fy)
    p = np.real(np.fft.ifft2(f * ((r >= 2) & (r <= 16))))
    return (p - p.mean()) / p.std()


def _resized(p: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(p.astype(np.float32), "F").resize((w, h), Image.Resampling.BICUBIC))


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = (rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(2))
    return np.asarray(img).astype(np.float32)


def make_corpus(out: Path, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    www = out / "www"
    www.mkdir(parents=True)
    gallery = [identity(rng) for _ in range(n)]
    rows, info = [], []
    for i in range(n):
        long = r.choice([320, 480, 640, 800, 1024, 1280, 1600, 2048])
        ratio = r.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3 / 4, 9 / 16, 1 / 2])
        w, h = (long, int(long / ratio)) if ratio >= 1 else (int(long * ratio), long)
        img = background(rng, w, h)
        boxes: list[list[float]] = []
        if r.random() < 2 / 3:
            for j in range(r.randint(1, 3)):
                side = r.uniform(0.08, 0.4) * min(w, h)  # pixels
                bw, bh = side, side * r.uniform(1.0, 1.3)
                for _ in range(50):  # place without overlap with the earlier boxes
                    x0, y0 = r.uniform(0, w - bw), r.uniform(0, h - bh)
                    rel = [x0 / w, y0 / h, (x0 + bw) / w, (y0 + bh) / h]
                    if all(rel[2] < b[0] or b[2] < rel[0] or rel[3] < b[1] or b[3] < rel[1] for b in boxes):
                        break
                else:
                    continue
                boxes.append([round(v, 5) for v in rel])
                px = [int(rel[0] * w), int(rel[1] * h), int(rel[2] * w), int(rel[3] * h)]
                pat = gallery[i] if j == 0 else identity(rng)
                face = _resized(pat, px[2] - px[0], px[3] - px[1])[:, :, None]
                skin = np.array([200.0, 160.0, 135.0])
                img[px[1] : px[3], px[0] : px[2]] = skin + 45.0 * face
        fmt = r.choices(["JPEG", "PNG", "RGBA", "WEBP"], [0.75, 0.1, 0.05, 0.1])[0]
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        if fmt == "RGBA":
            pil = pil.convert("RGBA")
        ext = {"JPEG": "jpg", "PNG": "png", "RGBA": "png", "WEBP": "webp"}[fmt]
        buf = io.BytesIO()
        pil.save(buf, "PNG" if fmt == "RGBA" else fmt, quality=r.choice([85, 92]))
        (www / f"f{i}.{ext}").write_bytes(buf.getvalue())
        rows.append({"name": f"f{i}.{ext}", "caption": f"image {i}", "face_bboxes": boxes or None})
        info.append({"w": w, "h": h, "boxes": boxes, "fmt": fmt})
    np.save(out / "gallery.npy", np.stack(gallery))
    (out / "info.json").write_text(json.dumps({"n": n, "seed": seed, "images": info}))
    (out / "rows.json").write_text(json.dumps(rows))
    return {"n": n}


# ---------------------------------------------------------------- running the tools


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_list(corpus: Path, port: int, work: Path) -> str:
    rows = json.loads((corpus / "rows.json").read_text())
    table = pa.Table.from_pylist(
        [
            {
                "url": f"http://127.0.0.1:{port}/{r['name']}",
                "caption": r["caption"],
                "face_bboxes": r["face_bboxes"],
            }
            for r in rows
        ],
        schema=pa.schema(
            [
                ("url", pa.string()),
                ("caption", pa.string()),
                ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
            ]
        ),
    )
    path = work / "urls.parquet"
    pq.write_table(table, path)
    return str(path)


def run_clipsearch(urls: str, out: Path, mode: str, extra: list[str]) -> None:
    cmd = [
        str(ROOT / ".venv/bin/python"), "-m", "clipsearch.download", "-q", "--url-list", urls,
        "--output-folder", str(out), "--caption-col", "caption", "--image-size", str(SIZE),
        "--resize-mode", mode, "--processes-count", "1", "--thread-count", "16", "--no-progress", *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def run_i2d(py: str, urls: str, out: Path, mode: str, extra: list[str]) -> None:
    cmd = [
        py, "-m", "img2dataset.main", "--url_list", urls, "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
        "--image_size", str(SIZE), "--resize_mode", mode, "--processes_count", "1", "--thread_count", "16",
        "--extract_exif", "False", "--enable_wandb", "False", *extra,
    ]  # fmt: skip
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    subprocess.run(cmd, check=True, capture_output=True, env=env)


def read_tar(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for t in sorted(folder.glob("*.tar")):
        with tarfile.open(t) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    data = tar.extractfile(m).read()
                    out[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


# ---------------------------------------------------------------- geometry and measures


def resized_dims(w: int, h: int, mode: str) -> tuple[int, int]:
    if mode == "no":
        return w, h
    scale = SIZE / (min(w, h) if mode in ("keep_ratio", "center_crop") else max(w, h))
    return round(w * scale), round(h * scale)


def offset(rw: int, rh: int, mode: str) -> tuple[int, int]:
    if mode == "border":
        return (SIZE - rw) // 2, (SIZE - rh) // 2
    if mode == "center_crop":
        return -((rw - SIZE) // 2), -((rh - SIZE) // 2)
    return 0, 0


def box_windows(img: dict, mode: str, strength: str) -> list[tuple[int, int, int, int]]:
    """Output rectangles the blur may touch (grown box + one radius), for the in/out-of-box MAD."""
    rw, rh = resized_dims(img["w"], img["h"], mode)
    dx, dy = offset(rw, rh, mode)
    pboxes, longest = blur.pixel_boxes([tuple(b) for b in img["boxes"]], rw, rh)
    r = len(blur.kernel_for(longest, strength)) // 2
    return [(x0 - r + dx, y0 - r + dy, x1 + r + dx, y1 + r + dy) for x0, y0, x1, y1 in pboxes]


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], info: list[dict], mode: str) -> dict:
    """MAD and PSNR over every key both stored; also inside / outside the box windows."""
    se = ad = px = 0.0
    in_ad = in_px = out_ad = out_px = 0.0
    worst = 0.0
    for key in sorted(set(a) & set(b)):
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        if x.shape != y.shape:
            return {"error": f"shape mismatch for {key}: {x.shape} vs {y.shape}"}
        d = np.abs(x - y)
        se += float((d**2).sum())
        ad += float(d.sum())
        px += d.size
        worst = max(worst, float(d.mean()))
        img = info[int(key[5:])]
        mask = np.zeros(x.shape[:2], bool)
        for x0, y0, x1, y1 in box_windows(img, mode, "datacomp") if img["boxes"] else []:
            mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        in_ad += float(d[mask].sum())
        in_px += mask.sum() * 3
        out_ad += float(d[~mask].sum())
        out_px += (~mask).sum() * 3
    mse = se / px
    return {
        "images": len(set(a) & set(b)),
        "only_in_one": len(set(a) ^ set(b)),
        "mad": round(ad / px, 3),
        "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse else float("inf"),
        "mad_in_boxes": round(in_ad / in_px, 3) if in_px else None,
        "mad_outside_boxes": round(out_ad / out_px, 3),
        "worst_image_mad": round(worst, 3),
    }


def _small(p: np.ndarray) -> np.ndarray:
    img = Image.fromarray(p.astype(np.float32), "F")
    return np.asarray(img.resize((GALLERY_PX, GALLERY_PX), Image.Resampling.BICUBIC), np.float64)


_FY = np.fft.fftfreq(GALLERY_PX)[:, None] * GALLERY_PX
_FX = np.fft.fftfreq(GALLERY_PX)[None, :] * GALLERY_PX
_RADIUS = np.hypot(_FX, _FY)
_WINDOW = np.outer(np.hanning(GALLERY_PX), np.hanning(GALLERY_PX))


def _band(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The part of a face (GALLERY_PX square, one box) between lo and hi cycles per box, unit norm."""
    p = (p - p.mean(axis=(-2, -1), keepdims=True)) * _WINDOW  # a crop is not periodic: no edge
    q = np.real(
        np.fft.ifft2(np.fft.fft2(p, axes=(-2, -1)) * ((_RADIUS >= lo) & (_RADIUS < hi)), axes=(-2, -1))
    )
    q = q.reshape(*q.shape[:-2], -1)
    q = q - q.mean(axis=-1, keepdims=True)
    return q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-9)


def face_crop(stored: np.ndarray, img: dict, mode: str, box: list[float]) -> np.ndarray | None:
    rw, rh = resized_dims(img["w"], img["h"], mode)
    dx, dy = offset(rw, rh, mode)
    x0, y0, x1, y1 = (
        int(box[0] * rw) + dx,
        int(box[1] * rh) + dy,
        int(box[2] * rw) + dx,
        int(box[3] * rh) + dy,
    )
    h, w = stored.shape[:2]
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h or x1 - x0 < 4 or y1 - y0 < 4:
        return None  # cropped away (center_crop) or too small to say anything
    return stored[y0:y1, x0:x1].astype(np.float64).mean(axis=2)


def _centre(p: np.ndarray) -> np.ndarray:
    """The middle half of a face on each side (where eyes, nose and mouth are), back at GALLERY_PX."""
    q = GALLERY_PX // 4
    return np.stack([_small(x[q:-q, q:-q]) for x in p]) if p.ndim == 3 else _small(p[q:-q, q:-q])


def identification(
    stored: dict[str, np.ndarray], info: list[dict], gallery: np.ndarray, mode: str, strength: str | None
) -> dict:
    """Top-1 identification of each image's first face among all identities, by normalised
    cross-correlation within each frequency band (an attacker who looks where detail is left), over
    the whole box and over its centre. The blend fades the blur out over the box's rim, so the rim
    keeps a part of its detail by design (DataComp's and img2dataset's method alike). With
    `strength`, the gallery is also blurred by the same Gaussian, scaled to the box: an attacker who
    knows the blur."""
    small = np.stack([_small(g) for g in gallery])
    res: dict = {"faces": 0}
    regions = {"box": lambda x: x, "centre": _centre}
    hits = {(r, b): 0 for r in regions for b in BANDS}
    hits_aware = dict.fromkeys(hits, 0)
    plain = {(r, b): _band(f(small), *band) for r, f in regions.items() for b, band in BANDS.items()}
    for key, arr in stored.items():
        i = int(key[5:])
        img = info[i]
        if not img["boxes"]:
            continue
        crop = face_crop(arr, img, mode, img["boxes"][0])
        if crop is None:
            continue
        res["faces"] += 1
        probe = _small(crop)
        blurred = None
        if strength is not None:
            rw, rh = resized_dims(img["w"], img["h"], mode)
            _, longest = blur.pixel_boxes([tuple(b) for b in img["boxes"]], rw, rh)
            k = blur.kernel_for(longest, strength)
            sigma = float(np.sqrt((k * (np.arange(len(k)) - len(k) // 2) ** 2).sum()))  # the kernel's std
            box_px = max(1, int(img["boxes"][0][2] * rw) - int(img["boxes"][0][0] * rw))
            s = sigma * GALLERY_PX / box_px
            r = max(1, int(np.ceil(3 * s)))
            m, _, _ = blur._pass_matrix(0, GALLERY_PX, GALLERY_PX, blur.gaussian_kernel(2 * r + 1, s))
            blurred = m @ small @ m.T
        for (region, b), g in plain.items():
            q = _band(regions[region](probe), *BANDS[b])
            hits[region, b] += int(np.argmax(g @ q) == i)
            if blurred is not None:
                hits_aware[region, b] += int(np.argmax(_band(regions[region](blurred), *BANDS[b]) @ q) == i)
    n = res["faces"] or 1
    res["top1"] = {f"{r} {b}": round(h / n, 3) for (r, b), h in hits.items()}
    if strength is not None:
        res["top1_blur_aware"] = {f"{r} {b}": round(h / n, 3) for (r, b), h in hits_aware.items()}
    res["chance"] = round(1 / len(gallery), 3)
    return res


_BLUR_ALONE = """
import importlib.util, json, sys
import numpy as np
from img2dataset.blurrer import BoundingBoxBlurrer
spec = importlib.util.spec_from_file_location("blur", sys.argv[1])
blur = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blur)
data = np.load(sys.argv[2], allow_pickle=True).item()
ref, worst, diff_px, px = BoundingBoxBlurrer(), 0, 0, 0
for arr, boxes in data.values():
    a = ref(arr, boxes).astype(int)  # img2dataset 1.47's blurrer (OpenCV), on the same pixels
    b = blur.blur_array(arr, [tuple(x) for x in boxes], "img2dataset-1.47").astype(int)
    changed = b != arr  # where img2dataset's float truncation alone moves a pixel, ours does not
    d = np.abs(a - b)[changed]
    worst, diff_px, px = max(worst, int(d.max(initial=0))), diff_px + int((d > 0).sum()), px + int(changed.sum())
print(json.dumps({"images": len(data), "blurred_values": px, "max_abs_diff": worst, "share_differing": round(diff_px / max(px, 1), 4)}))
"""


def blur_alone(py: str, stored: dict[str, np.ndarray], info: list[dict], work: Path) -> dict:
    """clipsearch's blur against img2dataset 1.47's BoundingBoxBlurrer on identical pixels (the resized,
    unpadded images), in img2dataset's venv: what is left once the resizers are out of the picture."""
    data = {}
    for key, arr in stored.items():
        img = info[int(key[5:])]
        if img["boxes"]:
            rw, rh = resized_dims(img["w"], img["h"], "keep_ratio_largest")
            data[key] = (np.ascontiguousarray(arr[:rh, :rw]), img["boxes"])
    np.save(work / "blur_alone.npy", data, allow_pickle=True)
    (work / "blur_alone.py").write_text(_BLUR_ALONE)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    r = subprocess.run(
        [
            py,
            str(work / "blur_alone.py"),
            str(ROOT / "src/clipsearch/download/blur.py"),
            str(work / "blur_alone.npy"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=90, help="images (one identity each)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--corpus", default=None, help="cache folder for the corpus (default: a temp dir)")
    ap.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument("--i2d-python", default="/work/venvs/img2dataset/bin/python")
    ap.add_argument("--modes", nargs="+", default=MODES)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below (nginx, temp dirs)

    work = Path(tempfile.mkdtemp(prefix="blur-compare-"))
    corpus = Path(a.corpus) if a.corpus else work / "corpus"
    info_path = corpus / "info.json"
    meta = json.loads(info_path.read_text()) if info_path.exists() else {}
    if (meta.get("n"), meta.get("seed")) != (a.n, a.seed):
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, a.n, a.seed)
    info = json.loads(info_path.read_text())["images"]
    gallery = np.load(corpus / "gallery.npy")
    port = free_port()
    pidfile = subprocess.run(
        ["sh", f"{a.bench_dir}/serve.sh", str(corpus / "www"), str(port)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    time.sleep(0.3)
    urls = url_list(corpus, port, work)
    results: dict = {
        "n_images": a.n,
        "with_boxes": sum(bool(i["boxes"]) for i in info),
        "boxes": sum(len(i["boxes"]) for i in info),
        "seed": a.seed,
        "image_size": SIZE,
        "uptime": os.popen("uptime").read().strip(),
        "modes": {},
    }
    try:
        for mode in a.modes:
            outs = {
                "i2d": (run_i2d, ["--bbox_col", "face_bboxes"]),
                "i2d_plain": (run_i2d, []),
                "cs_147": (
                    run_clipsearch,
                    ["--bbox-col", "face_bboxes", "--blur-strength", "img2dataset-1.47"],
                ),
                "cs_datacomp": (run_clipsearch, ["--bbox-col", "face_bboxes"]),
                "cs_plain": (run_clipsearch, []),
            }
            if mode == "no":  # --skip-reencode: img2dataset 1.47 keeps a JPEG's original bytes, faces and all
                outs["i2d_skip"] = (run_i2d, ["--bbox_col", "face_bboxes", "--skip_reencode", "True"])
                outs["cs_skip"] = (run_clipsearch, ["--bbox-col", "face_bboxes", "--skip-reencode"])
            stored = {}
            for name, (fn, extra) in outs.items():
                folder = work / f"{mode}-{name}"
                if fn is run_i2d:
                    run_i2d(a.i2d_python, urls, folder, mode, extra)
                else:
                    run_clipsearch(urls, folder, mode, extra)
                stored[name] = read_tar(folder)
                shutil.rmtree(folder, ignore_errors=True)
            m = {
                "clipsearch_1.47_vs_img2dataset": compare(stored["cs_147"], stored["i2d"], info, mode),
                "clipsearch_datacomp_vs_img2dataset": compare(
                    stored["cs_datacomp"], stored["i2d"], info, mode
                ),
                "no_blur_clipsearch_vs_img2dataset": compare(
                    stored["cs_plain"], stored["i2d_plain"], info, mode
                ),
                "identification": {
                    "unblurred (clipsearch, no --bbox-col)": identification(
                        stored["cs_plain"], info, gallery, mode, None
                    ),
                    "img2dataset 1.47": identification(
                        stored["i2d"], info, gallery, mode, "img2dataset-1.47"
                    ),
                    "clipsearch --blur-strength img2dataset-1.47": identification(
                        stored["cs_147"], info, gallery, mode, "img2dataset-1.47"
                    ),
                    "clipsearch (datacomp, default)": identification(
                        stored["cs_datacomp"], info, gallery, mode, "datacomp"
                    ),
                },
            }
            if "i2d_skip" in stored:
                m["skip_reencode"] = {
                    "clipsearch_1.47_vs_img2dataset": compare(
                        stored["cs_skip"], stored["i2d_skip"], info, mode
                    ),
                    "img2dataset 1.47 --skip_reencode": identification(
                        stored["i2d_skip"], info, gallery, mode, None
                    ),
                    "clipsearch --skip-reencode": identification(
                        stored["cs_skip"], info, gallery, mode, None
                    ),
                }
            results["modes"][mode] = m
            print(mode, json.dumps(m), flush=True)
            if mode == "keep_ratio_largest":
                results["blur_alone_vs_img2dataset_blurrer"] = blur_alone(
                    a.i2d_python, stored["i2d_plain"], info, work
                )
                print("blur alone", json.dumps(results["blur_alone_vs_img2dataset_blurrer"]), flush=True)
    finally:
        subprocess.run(["sh", "-c", f"kill $(cat {pidfile})"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| mode | 1.47 kernel: MAD | PSNR | MAD in boxes | datacomp: MAD | PSNR | no blur: MAD | PSNR |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, m in results["modes"].items():
        x, y, z = (
            m["clipsearch_1.47_vs_img2dataset"],
            m["clipsearch_datacomp_vs_img2dataset"],
            m["no_blur_clipsearch_vs_img2dataset"],
        )
        print(
            f"| {mode} | {x['mad']} | {x['psnr_db']} | {x['mad_in_boxes']} | {y['mad']} | {y['psnr_db']} | "
            f"{z['mad']} | {z['psnr_db']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
