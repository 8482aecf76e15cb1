#!/usr/bin/env python
"""Issue 17's two quality goals, measured on built demo indices through the served API (`POST /knn`).

For each `--index NAME=DIR` (a folder `clipsearch demo --no-serve` built: its metadata has the sample's
`color`, `shape` and `quality` columns, and the demo rated it with the shipped quality predictor), the app is
the one `clipsearch demo` serves (the index, the tiny CLIP, `clipsearch-tiny-multilingual`), driven in-process:

1. **Aesthetic nudging**: the 48 colour+shape queries in English ("a red circle"), `k=24`, the server's
   defaults otherwise (dedup on), without `aesthetic_score` and then with `aesthetic_score=9` at each
   `--weights`: the mean quality of the top 24 (share of sharp images) and colour+shape precision@24.
   Goal: quality rises with the weight while precision@24 drops by no more than 0.1.
2. **Queries in many languages**: precision@5 of the 48 colour+shape queries in each language with
   `multilingual: true` (the canonical phrasing, "un cercle rouge", and the phrasing the encoder never
   trained on, "une photo d'un cercle rouge", marked *), against English through the index's own CLIP.
   Goal: each language >= 0.9 x English. The demo's images (seed 0) are held out: the encoder trained on
   text only, and its own evaluation used images of seed 2000.

Usage::

    .venv/bin/clipsearch demo --no-serve --data-dir demo-data                      # seed 0, 3000, 40 % degraded
    .venv/bin/clipsearch demo --no-serve --data-dir /tmp/demo-b --seed 11 --num-images 2000 --degraded 0.25 --port 18732
    .venv/bin/python benchmarks/serve_demo_goals.py --index a=demo-data/build/index \
        --index b=/tmp/demo-b/build/index --out benchmarks/results-serve-demo-goals.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipsearch.demo.languages import LANGUAGES, canonical, held_out  # noqa: E402
from clipsearch.demo.sample import COLORS, SHAPES  # noqa: E402

PAIRS = [(c, s) for c in COLORS for s in SHAPES]
COLUMNS = ["color", "shape", "quality"]


def _ask(client, body: dict) -> list[dict]:
    r = client.post("/knn", json={"columns": COLUMNS, **body})
    if r.status_code != 200:
        raise SystemExit(f"/knn {body}: {r.status_code} {r.text[:300]}")
    return r.json()["results"]


def _scores(client, texts: list[str], k: int, **extra) -> tuple[float, float]:
    """(colour+shape precision@k, share of sharp images in the top k), means over the 48 queries."""
    prec, qual = [], []
    for text, (c, s) in zip(texts, PAIRS, strict=True):
        hits = _ask(client, {"text": text, "k": k, **extra})
        if len(hits) < k:
            raise SystemExit(f"{text!r}: {len(hits)} results for k={k}")
        prec.append(sum(h["color"] == c and h["shape"] == s for h in hits) / k)
        qual.append(sum(h["quality"] == "sharp" for h in hits) / k)
    return round(sum(prec) / len(prec), 4), round(sum(qual) / len(qual), 4)


def measure(index_dir: str, weights: list[float]) -> dict:
    import pyarrow.feather as feather
    from fastapi.testclient import TestClient

    from clipsearch.demo.cli import demo_app

    meta = feather.read_table(os.path.join(index_dir, "metadata.arrow"), columns=["quality"]).column(0)
    sharp_share = round(sum(q == "sharp" for q in meta.to_pylist()) / len(meta), 4)
    out: dict = {"index": index_dir, "images": len(meta), "sharp_share": sharp_share}
    english = [canonical("en", c, s) for c, s in PAIRS]
    with TestClient(demo_app(Path(index_dir), Path(index_dir).resolve().parents[1])) as client:
        t0 = time.time()
        p, q = _scores(client, english, 24)
        nudging = {"none": {"precision@24": p, "quality@24": q}}
        for w in weights:
            p, q = _scores(client, english, 24, aesthetic_score=9, aesthetic_weight=w)
            nudging[str(w)] = {"precision@24": p, "quality@24": q}
        out["aesthetic_score_9"] = nudging
        en5, _ = _scores(client, english, 5)
        langs = {"en (index CLIP)": en5}
        for lang in LANGUAGES:
            langs[lang] = _scores(client, [canonical(lang, c, s) for c, s in PAIRS], 5, multilingual=True)[0]
            langs[lang + "*"] = _scores(
                client, [held_out(lang, c, s) for c, s in PAIRS], 5, multilingual=True
            )[0]
        out["precision@5"] = langs
        out["precision@5_ratio_to_english"] = {k: round(v / en5, 4) for k, v in langs.items()}
        out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", action="append", required=True, help="NAME=DIR of a built demo index")
    p.add_argument("--weights", default="0,0.25,0.5,1,2", help="aesthetic_weight values, comma-separated")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "indices": {},
    }
    for spec in args.index:
        name, _, folder = spec.partition("=")
        report["indices"][name] = measure(folder, weights)
        print(json.dumps({name: report["indices"][name]}, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
