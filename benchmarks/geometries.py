"""CLIP-like embedding generators with different geometries, for the index benchmark.

Usage:
    python benchmarks/geometries.py GEOMETRY OUTDIR N [--dim 512] [--seed 1] [--queries 1000] [--embed-folder]
    python benchmarks/geometries.py --list

`isotropic` replays the shared generator (its files come out identical; the evaluation queries are its
`queries.npy`, 1000 or --queries of them) and adds a separate draw of tuning queries and captions.

`/work/shared/bench/make_embeddings.py` draws isotropic clusters: every direction of the sphere carries
the same variance and the image and query distributions share their mean. Real CLIP embeddings do not
look like that. They have a large shared mean (two random images have a cosine of about 0.5), a fast
decaying spectrum (a few dozen directions carry most of the variance), clusters of very different
sizes (a power law: many photos of dogs, few of theodolites), some coordinates with much more variance
or a much larger mean than others, and a gap between the image and the text cones (a matching caption
has a cosine of about 0.3 with its image, a random caption about 0.15).

Each geometry below sets these traits differently. The model behind all of them: a semantic latent
`z = c_k + w` (cluster centre plus within-cluster spread, both drawn with the geometry's spectrum in a
basis that is random, or partly aligned with the coordinates); an image is
`normalise(mean_img + z + noise)`; a text is `normalise(mean_txt + T z' + noise)` with its own mean
(the modality gap), its own weighting `T` of the semantic directions, and `z'` nearer the concept's
centre than an image's `z` (a query names a concept, it does not describe one photo).

Writes OUTDIR/emb/part_XXX.npy (float16, L2-normalised images, 100k rows per part), OUTDIR/queries.npy
(text-like evaluation queries, float32), OUTDIR/gt.npy (their exact top-100 over the images),
OUTDIR/tune_queries.npy (a *separate* draw of text-like queries, for `--tuning-queries`: never the
evaluation queries), OUTDIR/stats.json (the measured traits), and with --embed-folder an embed-stage
folder OUTDIR/embeddings/ (img_emb, text_emb = one caption per image, metadata, manifest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

PART_ROWS = 100_000


@dataclass(frozen=True)
class Geometry:
    clusters: int  # number of concepts
    zipf: float  # cluster size ~ rank^-zipf (0: equal sizes)
    decay: float  # spectrum: variance of direction j ~ (j + 1)^-decay
    axis_aligned: float  # 0: random basis; 1: the spectrum lies along the coordinates
    image_mean: float  # norm of the shared image mean (the semantic part has variance `shared`)
    text_mean: float  # the same for texts
    gap_cos: float  # cosine between the image mean and the text mean directions
    shared: float  # variance of the semantic part both modalities see
    image_specific: float  # variance of what only images carry (style, light, framing), unclustered
    text_specific: float  # variance of what only texts carry (wording), in another basis
    within: float  # within-cluster spread, relative to the centres' spread
    query_within: float  # spread of a query around its concept (texts name concepts)
    text_weight_sigma: float  # log-normal spread of the text tower's weighting of each semantic direction
    noise: float  # isotropic noise norm
    outlier_dims: int = 0  # coordinates with a large mean (CLIP's "massive activation" channels)
    outlier_scale: float = 0.0
    note: str = ""


GEOMETRIES: dict[str, Geometry] = {
    # near published CLIP ViT-B/32 statistics: image-image cosine ~0.5, text-text ~0.6, matching
    # caption-image ~0.3 and random ~0.15, power-law concept sizes, ~20 directions hold half the variance
    "clip": Geometry(
        clusters=4000,
        zipf=1.0,
        decay=1.0,
        axis_aligned=0.0,
        image_mean=1.57,
        text_mean=1.91,
        gap_cos=0.28,
        shared=0.6,
        image_specific=1.66,
        text_specific=1.0,
        within=0.6,
        query_within=0.3,
        text_weight_sigma=0.3,
        noise=0.35,
        note="CLIP-like: shared mean, 1/j spectrum, power-law concepts, modality gap",
    ),
    # a steep spectrum partly along the coordinates, few large concepts, a small gap
    "steep": Geometry(
        clusters=800,
        zipf=1.3,
        decay=1.6,
        axis_aligned=0.6,
        image_mean=1.0,
        text_mean=1.4,
        gap_cos=0.5,
        shared=0.8,
        image_specific=0.8,
        text_specific=0.6,
        within=0.8,
        query_within=0.4,
        text_weight_sigma=0.3,
        noise=0.25,
        note="steep spectrum (j^-1.6), partly axis-aligned, 800 concepts of very unequal sizes, small gap",
    ),
    # a huge shared mean and a flat-ish spectrum, many small concepts of equal size, a wide gap
    "wide-gap": Geometry(
        clusters=12000,
        zipf=0.0,
        decay=0.6,
        axis_aligned=0.0,
        image_mean=2.0,
        text_mean=2.2,
        gap_cos=0.1,
        shared=0.5,
        image_specific=1.5,
        text_specific=1.2,
        within=0.5,
        query_within=0.25,
        text_weight_sigma=0.8,
        noise=0.3,
        note="large shared mean, flat-ish spectrum (j^-0.6), 12k equal concepts, wide modality gap",
    ),
    # the coordinates carry very unequal variance, and a few have a large constant value
    "outliers": Geometry(
        clusters=3000,
        zipf=1.1,
        decay=1.2,
        axis_aligned=1.0,
        image_mean=1.3,
        text_mean=1.6,
        gap_cos=0.3,
        shared=0.7,
        image_specific=1.2,
        text_specific=1.0,
        within=0.7,
        query_within=0.35,
        text_weight_sigma=0.5,
        noise=0.3,
        outlier_dims=6,
        outlier_scale=3.0,
        note="axis-aligned spectrum (j^-1.2) and 6 outlier coordinates with a large mean",
    ),
}


def _basis(rng, d: int, axis_aligned: float) -> np.ndarray:
    """Orthonormal columns: a random rotation, or partly a permutation of the coordinates."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if axis_aligned > 0:
        perm = np.eye(d)[rng.permutation(d)]
        q, _ = np.linalg.qr((1 - axis_aligned) * q + axis_aligned * perm)
    return q.astype(np.float32)


class Model:
    """One geometry's random draw: bases, means, text weighting, concepts."""

    def __init__(self, g: Geometry, d: int, seed: int):
        self.g, self.d = g, d
        rng = np.random.default_rng(seed)
        self.basis = _basis(rng, d, g.axis_aligned)  # semantic and image-specific directions
        self.text_basis = _basis(rng, d, 0.0)  # text-specific directions
        lam = (np.arange(d) + 1.0) ** -g.decay
        self.scale = np.sqrt(lam / lam.sum()).astype(np.float32)  # total variance 1
        mi = rng.standard_normal(d)
        if g.outlier_dims:
            mi[rng.choice(d, g.outlier_dims, replace=False)] += g.outlier_scale * np.sqrt(d / g.outlier_dims)
        mi /= np.linalg.norm(mi)
        perp = rng.standard_normal(d)
        perp -= perp @ mi * mi
        perp /= np.linalg.norm(perp)
        mt = g.gap_cos * mi + np.sqrt(1 - g.gap_cos**2) * perp
        self.mean_img = (g.image_mean * mi).astype(np.float32)
        self.mean_txt = (g.text_mean * mt).astype(np.float32)
        w = np.exp(g.text_weight_sigma * rng.standard_normal(d))
        self.text_w = (w / np.sqrt(np.mean(w**2))).astype(np.float32)
        s = np.sqrt(g.shared / (1 + g.within**2))
        self.centres = (s * rng.standard_normal((g.clusters, d)) * self.scale).astype(np.float32)
        self.spread = s
        p = (np.arange(g.clusters) + 1.0) ** -g.zipf
        self.cluster_p = p / p.sum()

    def _latent(self, rng, labels: np.ndarray, within: float) -> np.ndarray:
        noise = rng.standard_normal((len(labels), self.d)).astype(np.float32) * self.scale
        return self.centres[labels] + (self.spread * within) * noise

    def _noise(self, rng, n: int) -> np.ndarray:
        return (self.g.noise / np.sqrt(self.d)) * rng.standard_normal((n, self.d)).astype(np.float32)

    def _specific(self, rng, n: int, var: float, basis: np.ndarray) -> np.ndarray:
        u = rng.standard_normal((n, self.d)).astype(np.float32) * (np.sqrt(var) * self.scale)
        return u @ basis.T

    @staticmethod
    def _norm(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def images(self, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(images, semantic latents)."""
        labels = rng.choice(self.g.clusters, size=n, p=self.cluster_p)
        lat = self._latent(rng, labels, self.g.within)
        x = lat @ self.basis.T + self._specific(rng, n, self.g.image_specific, self.basis)
        return self._norm(x + self.mean_img + self._noise(rng, n)), lat

    def _texts(self, rng, lat: np.ndarray) -> np.ndarray:
        n = len(lat)
        t = (lat * self.text_w) @ self.basis.T + self._specific(rng, n, self.g.text_specific, self.text_basis)
        return self._norm(t + self.mean_txt + self._noise(rng, n))

    def texts_for(self, rng, lat: np.ndarray) -> np.ndarray:
        """Captions of given images: the text tower's view of the image's own semantic latent."""
        return self._texts(rng, lat)

    def queries(self, rng, n: int) -> np.ndarray:
        """Text queries naming concepts drawn like the images (popular concepts are asked more)."""
        labels = rng.choice(self.g.clusters, size=n, p=self.cluster_p)
        return self._texts(rng, self._latent(rng, labels, self.g.query_within))


def traits(x: np.ndarray, caps: np.ndarray, q: np.ndarray, rng) -> dict:
    """The statistics the geometry is meant to vary, measured on a sample."""
    s = x[rng.choice(len(x), min(20000, len(x)), replace=False)].astype(np.float64)
    mean = s.mean(0)
    cov = np.cov(s.T)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    half = int(np.searchsorted(np.cumsum(ev) / ev.sum(), 0.5)) + 1
    var = np.sort(s.var(0))
    i, j = rng.integers(0, len(s), 2000), rng.integers(0, len(s), 2000)
    qs = q.astype(np.float64)
    return {
        "image_mean_norm": round(float(np.linalg.norm(mean)), 3),
        "image_image_cos": round(float(np.mean(np.sum(s[i] * s[j], 1))), 3),
        "text_text_cos": round(float(np.mean(np.sum(qs[: len(qs) // 2] * qs[len(qs) // 2 :], 1))), 3),
        "caption_image_cos_matched": round(float(np.mean(np.sum(caps * x[: len(caps)], 1))), 3),
        "caption_image_cos_random": round(float(np.mean(np.sum(caps * x[-len(caps) :][::-1], 1))), 3),
        "directions_for_half_variance": half,
        "top1_eigen_share": round(float(ev[0] / ev.sum()), 3),
        "coordinate_variance_max_over_median": round(float(var[-1] / var[len(var) // 2]), 1),
    }


def shared_isotropic(out: str, n: int, d: int, nq: int, embed_folder: bool) -> None:
    """The shared generator (/work/shared/bench/make_embeddings.py, isotropic clusters), replayed draw
    for draw so its files come out identical, plus what it lacks: a separate draw of tuning queries and,
    with embed_folder, one caption per image made the way its queries are (0.35 x the image's
    direction + 0.9 x the shared text offset + noise)."""
    rng = np.random.default_rng(1)
    k = 2000
    centers = rng.standard_normal((k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    os.makedirs(os.path.join(out, "emb"), exist_ok=True)
    parts = []
    for p, s in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - s)
        lab = rng.integers(0, k, m)
        x = centers[lab] + 0.06 * rng.standard_normal((m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(os.path.join(out, "emb", f"part_{p:03d}.npy"), x.astype(np.float16))
        parts.append(x.astype(np.float16))
    gap = rng.standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)
    lab = rng.integers(0, k, nq)
    q = 0.35 * centers[lab] + 0.9 * gap + 0.08 * rng.standard_normal((nq, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.save(os.path.join(out, "queries.npy"), q.astype(np.float32))
    r2 = np.random.default_rng(3001)
    lab = r2.integers(0, k, nq)
    qt = 0.35 * centers[lab] + 0.9 * gap + 0.08 * r2.standard_normal((nq, d)).astype(np.float32)
    qt /= np.linalg.norm(qt, axis=1, keepdims=True)
    np.save(os.path.join(out, "tune_queries.npy"), qt.astype(np.float32))
    caps_rng = np.random.default_rng(4001)
    for p, x16 in enumerate(parts):
        if embed_folder:
            x = x16.astype(np.float32)
            c = 0.35 * x + 0.9 * gap + 0.08 * caps_rng.standard_normal(x.shape).astype(np.float32)
            c /= np.linalg.norm(c, axis=1, keepdims=True)
            _write_embed_part(os.path.join(out, "embeddings"), p, x16, c.astype(np.float16), p * PART_ROWS)
    if embed_folder:
        _write_manifest(os.path.join(out, "embeddings"), d, [len(p) for p in parts])
    import faiss

    idx = faiss.IndexFlatIP(d)
    idx.add(np.concatenate(parts).astype(np.float32))
    _, gt = idx.search(q, 100)
    np.save(os.path.join(out, "gt.npy"), gt)
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump({"geometry": "isotropic", "n": n, "dim": d, "generator": "shared make_embeddings.py"}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("geometry", nargs="?", choices=sorted(GEOMETRIES) + ["isotropic"])
    ap.add_argument("out", nargs="?")
    ap.add_argument("n", nargs="?", type=int)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1, help="the draw: use other seeds while developing")
    ap.add_argument(
        "--queries", type=int, default=1000, help="evaluation queries (and as many tuning queries)"
    )
    ap.add_argument(
        "--embed-folder", action="store_true", help="also write an embed-stage folder with captions"
    )
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list or not a.geometry:
        for name, g in GEOMETRIES.items():
            print(f"{name:10s} {g.note}")
        return
    if a.geometry == "isotropic":
        return shared_isotropic(a.out, a.n, a.dim, a.queries, a.embed_folder)
    g = GEOMETRIES[a.geometry]
    m = Model(g, a.dim, a.seed)
    os.makedirs(os.path.join(a.out, "emb"), exist_ok=True)
    rng = np.random.default_rng(a.seed + 1000)
    parts = []
    cap_sample = None
    for p, s in enumerate(range(0, a.n, PART_ROWS)):
        x, lat = m.images(rng, min(PART_ROWS, a.n - s))
        x16 = x.astype(np.float16)
        np.save(os.path.join(a.out, "emb", f"part_{p:03d}.npy"), x16)
        parts.append(x16)
        caps = m.texts_for(rng, lat)
        if cap_sample is None:
            cap_sample = caps[:2000]
        if a.embed_folder:
            _write_embed_part(os.path.join(a.out, "embeddings"), p, x16, caps.astype(np.float16), s)
    q_eval = m.queries(np.random.default_rng(a.seed + 2000), a.queries)
    q_tune = m.queries(np.random.default_rng(a.seed + 3000), a.queries)
    np.save(os.path.join(a.out, "queries.npy"), q_eval.astype(np.float32))
    np.save(os.path.join(a.out, "tune_queries.npy"), q_tune.astype(np.float32))
    import faiss

    xb = np.concatenate(parts).astype(np.float32)
    idx = faiss.IndexFlatIP(a.dim)
    idx.add(xb)
    _, gt = idx.search(q_eval.astype(np.float32), 100)
    np.save(os.path.join(a.out, "gt.npy"), gt)
    st = {"geometry": a.geometry, "n": a.n, "dim": a.dim, "seed": a.seed, "params": asdict(g)}
    st["traits"] = traits(xb, cap_sample, q_eval, np.random.default_rng(0))
    if a.embed_folder:
        _write_manifest(os.path.join(a.out, "embeddings"), a.dim, [len(p) for p in parts])
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(st, f, indent=2)
    print(json.dumps(st["traits"]))


def _write_embed_part(folder: str, p: int, img: np.ndarray, txt: np.ndarray, first: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "text_emb", "metadata", "stats"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    name = f"{p:05d}"
    np.save(os.path.join(folder, "img_emb", name + ".npy"), img)
    np.save(os.path.join(folder, "text_emb", name + ".npy"), txt)
    keys = [f"{first + i:09d}" for i in range(len(img))]
    table = pa.table(
        {
            "key": keys,
            "url": [f"http://127.0.0.1/{k}.jpg" for k in keys],
            "caption": [f"sample {k}" for k in keys],
        }
    )
    pq.write_table(table, os.path.join(folder, "metadata", name + ".parquet"))
    with open(os.path.join(folder, "stats", name + ".json"), "w") as f:
        json.dump({"rows": len(img)}, f)


def _write_manifest(folder: str, dim: int, rows: list[int]) -> None:
    manifest = {
        "format": "clipsearch.embeddings",
        "version": 1,
        "model": None,
        "dim": dim,
        "dtype": "float16",
        "normalized": True,
        "modalities": ["image", "text"],
        "parts": [{"name": f"{p:05d}", "rows": r, "inputs": []} for p, r in enumerate(rows)],
        "total_rows": sum(rows),
    }
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
