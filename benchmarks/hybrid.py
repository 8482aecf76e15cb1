"""Benchmark hybrid search (caption keywords + CLIP) for docs/bench-hybrid.md.

    .venv/bin/python benchmarks/hybrid.py --work /work/benchdata/hybrid [--only quality|build|serve]
        [--n-quality 6000] [--n-speed 1000000] [--dim 512] [--model /work/benchdata/vitb32] [--duration 20]

1. quality (real pixels, the shipped tiny CLIP): two corpora of generated images (a coloured shape on a
   texture, `clipsearch.demo.sample`) whose captions carry rare tokens (serial numbers, made-up product-line
   names) next to ordinary descriptions, with different geometry:
     catalog:  70 % of the captions describe the picture, 60 % name a product line (~24 items each),
               50 % carry a serial number;
     alt-text: 35 % describe it, 10 % describe it wrongly, 40 % name a line (~10 items each), 30 % a serial.
   Images and captions are embedded with the tiny CLIP, indexed with `clipsearch index` (default options), and
   three kinds of queries are run in process through `clipsearch.search` (the code /knn runs):
     rare:        a serial number (one relevant row) or a line name alone (its rows);
     descriptive: "a red circle" / "a red circle on grass" (relevant: the pictures, whatever the caption says);
     mixed:       a description and a line name, "a red circle by Vellmora" (relevant: that line's red circles).
     sparse:   50 % describe it, 5 % wrongly, 25 % name a line (~40 items each), 15 % a serial.
   recall@10 = |top 10 and relevant| / min(10, |relevant|), for semantic, keyword, hybrid (weighted) and
   hybrid (rrf). The fusion's constants (clipsearch/search/hybrid.py) were set on the development corpus
   (`--seed 0 --n-quality 1500 --profiles catalog alt-text`); the evaluation uses other seeds, 6,000 rows and
   the `sparse` profile, which development never saw.
2. build: a 1M-row embed-stage folder (clustered `--dim` vectors for images and captions, captions from the
   catalog generator) indexed with `clipsearch index` defaults: the keyword index's share of the build time.
3. serve: `clipsearch serve` on that index (`--model`, a random-weight ViT-B/32 by default: real compute;
   `--backend auto`, the server's default: OpenVINO bf16 on this machine),
   p50/p90/p99 at concurrency 1 of semantic, hybrid and keyword text queries, interleaved rounds, plus the
   server's own step timings (encode, search, keywords).
Results: WORK/results-hybrid.json, printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as sb  # noqa: E402 - benchmarks/serve.py: load generator, server start/stop

ROOT = Path(__file__).resolve().parent.parent
SYLLABLES = "vel mor qui trax zor blat fen dra lux ory kal mex tor vin sap rel gon dux pry nax".split()
PROFILES = {
    "catalog": {"p_desc": 0.7, "p_wrong": 0.0, "p_line": 0.6, "p_serial": 0.5, "per_line": 24},
    "alt-text": {"p_desc": 0.35, "p_wrong": 0.10, "p_line": 0.4, "p_serial": 0.3, "per_line": 10},
    # never seen while the fusion was developed: few, large product lines and few serials
    "sparse": {"p_desc": 0.5, "p_wrong": 0.05, "p_line": 0.25, "p_serial": 0.15, "per_line": 40},
}
FILLERS = ["product photo", "buy now", "new arrival", "high quality image", "free shipping", "in stock", ""]


# ---------------------------------------------------------------------------------------------- corpus
def line_names(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    longest = 4 if n <= 2000 else 5  # 2-3 syllables (8,400 names), 2-4 for the 1M corpus's 25,000 lines
    while len(out) < n:
        k = int(rng.integers(2, longest))
        out.add("".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), k)).capitalize())
    return sorted(out)


def make_items(n: int, profile: str, seed: int) -> list[dict]:
    from clipsearch.demo.sample import BACKGROUNDS, COLORS, SHAPES, make_caption

    p = PROFILES[profile]
    rng = np.random.default_rng(seed)
    lines = line_names(max(1, int(n * p["p_line"] / p["per_line"])), seed + 1)
    if n <= 900_000:
        serials = rng.choice(900_000, size=n, replace=False) + 100_000
    else:  # seven digits for the 1M corpus
        serials = rng.permutation(9_000_000)[:n] + 1_000_000
    # every random draw up front, vectorised (1M items in seconds)
    col, shp, bgs = (rng.integers(0, len(x), n) for x in (COLORS, SHAPES, BACKGROUNDS))
    has_line, line_of = rng.random(n) < p["p_line"], rng.integers(0, len(lines), n)
    has_serial, r_desc = rng.random(n) < p["p_serial"], rng.random(n)
    wrong = [rng.integers(0, len(x), n) for x in (COLORS, SHAPES, BACKGROUNDS)]
    by, line_pos, serial_word = rng.random(n) < 0.5, rng.integers(0, 2, n), rng.random(n) < 0.5
    filler = rng.integers(0, len(FILLERS), n)
    letters, second = "ABCDEFGHJKLMNPQRSTUVWXYZ", "KXQZRT"
    items = []
    for i in range(n):
        color, shape, bg = COLORS[col[i]], SHAPES[shp[i]], BACKGROUNDS[bgs[i]]
        line = lines[line_of[i]] if has_line[i] else None
        serial = f"{letters[i % 24]}{second[i % 6]}-{serials[i]}" if has_serial[i] else None
        parts = []
        if r_desc[i] < p["p_desc"]:
            parts.append(make_caption(color, shape, bg, rng))
        elif r_desc[i] < p["p_desc"] + p["p_wrong"]:  # web captions that say something else than the picture
            parts.append(
                make_caption(COLORS[wrong[0][i]], SHAPES[wrong[1][i]], BACKGROUNDS[wrong[2][i]], rng)
            )
        if line:
            parts.insert(min(int(line_pos[i]), len(parts)), f"by {line}" if by[i] else line)
        if serial:
            parts.append(f"{'serial' if serial_word[i] else 'SKU'} {serial}")
        if FILLERS[filler[i]] or not parts:
            parts.append(FILLERS[filler[i]] or "photo")
        items.append({"color": color, "shape": shape, "bg": bg, "line": line, "serial": serial,
                      "caption": ", ".join(parts)})  # fmt: skip
    return items


def write_embeddings(
    root: Path, items: list[dict], img: np.ndarray, txt: np.ndarray, model: str, part_rows: int
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "text_emb", "metadata", "stats"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    parts = []
    for p, s in enumerate(range(0, len(items), part_rows)):
        e = min(len(items), s + part_rows)
        name = f"{p:05d}"
        np.save(root / "img_emb" / f"{name}.npy", img[s:e].astype(np.float16))
        np.save(root / "text_emb" / f"{name}.npy", txt[s:e].astype(np.float16))
        keys = [f"{i:09d}" for i in range(s, e)]
        pq.write_table(
            pa.table({"key": keys, "url": [f"http://img.invalid/{k}.jpg" for k in keys],
                      "caption": [it["caption"] for it in items[s:e]]}),
            root / "metadata" / f"{name}.parquet",
        )  # fmt: skip
        (root / "stats" / f"{name}.json").write_text(json.dumps({"rows": e - s}))
        parts.append({"name": name, "rows": e - s, "inputs": []})
    manifest = {"format": "clipsearch.embeddings", "version": 1, "model": model, "dim": int(img.shape[1]),
                "dtype": "float16", "normalized": True, "modalities": ["image", "text"], "parts": parts,
                "total_rows": len(items)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------- queries
def make_queries(items: list[dict], seed: int) -> dict[str, list[tuple[str, set[int]]]]:
    from clipsearch.demo.sample import BACKGROUNDS, COLORS, SHAPES

    rng = np.random.default_rng(seed)
    by_serial = [i for i, it in enumerate(items) if it["serial"]]
    lines: dict[str, set[int]] = {}
    for i, it in enumerate(items):
        if it["line"]:
            lines.setdefault(it["line"], set()).add(i)
    rare = []
    for i in rng.choice(by_serial, size=min(100, len(by_serial)), replace=False):
        s = items[int(i)]["serial"]
        typed = [s, s.replace("-", ""), s.replace("-", " "), s.lower()][int(rng.integers(4))]
        rare.append((typed, {int(i)}))
    for name in rng.choice(sorted(lines), size=min(50, len(lines)), replace=False):
        rare.append((str(name), lines[str(name)]))
    desc = []
    for c in COLORS:
        for s in SHAPES:
            art = "an" if c[0] in "aeiou" else "a"
            desc.append(
                (f"{art} {c} {s}", {i for i, it in enumerate(items) if it["color"] == c and it["shape"] == s})
            )
            b = str(rng.choice(BACKGROUNDS))
            desc.append((f"{art} {c} {s} on {b}",
                         {i for i, it in enumerate(items) if (it["color"], it["shape"], it["bg"]) == (c, s, b)}))  # fmt: skip
    mixed = []
    with_line = [i for i, it in enumerate(items) if it["line"]]
    for i in rng.choice(with_line, size=min(100, len(with_line)), replace=False):
        it = items[int(i)]
        art = "an" if it["color"][0] in "aeiou" else "a"
        rel = {
            j
            for j in lines[it["line"]]
            if (items[j]["color"], items[j]["shape"]) == (it["color"], it["shape"])
        }
        mixed.append((f"{art} {it['color']} {it['shape']} by {it['line']}", rel))
    serial_mixed = []  # the example: one row carries the code, so keywords alone already find it
    for i in rng.choice(by_serial, size=min(50, len(by_serial)), replace=False):
        it = items[int(i)]
        serial_mixed.append((f"a {it['color']} {it['shape']} with code {it['serial']}", {int(i)}))
    return {
        "rare": rare,
        "descriptive": [d for d in desc if d[1]],
        "mixed": mixed,
        "mixed-serial": serial_mixed,
    }


def recall10(ids: list[int], rel: set[int]) -> float:
    return len(set(ids[:10]) & rel) / min(10, len(rel))


def evaluate(folder: str, encoder, queries: dict) -> dict:
    from clipsearch.keywords.query import parse
    from clipsearch.search import hybrid
    from clipsearch.search.live import open_index

    s = open_index(folder)
    pieces = hybrid.WordPieces(encoder.tokenize)  # as the server builds it from its encoder
    out: dict = {}
    try:
        for kind, qs in queries.items():
            texts = [t for t, _ in qs]
            vecs = np.asarray(encoder.encode_text(texts), dtype=np.float32)
            rows: dict[str, list[float]] = {"semantic": [], "keyword": [], "hybrid": [], "hybrid-rrf": []}
            for (text, rel), v in zip(qs, vecs, strict=True):
                kq = parse(text)
                sem = s.search(v[None], 10).ids[0]
                rows["semantic"].append(recall10([int(i) for i in sem if i >= 0], rel))
                kw = hybrid.keyword_search(s, kq, 10, vec=None, modality="image")
                rows["keyword"].append(recall10(kw.ids.tolist(), rel))
                for name, fusion in (("hybrid", "weighted"), ("hybrid-rrf", "rrf")):
                    r = hybrid.hybrid_search(s, v, kq, 10, modality="image", fusion=fusion, pieces=pieces)
                    rows[name].append(recall10(r.ids.tolist(), rel))
            out[kind] = {"queries": len(qs), **{m: round(float(np.mean(x)), 4) for m, x in rows.items()}}
    finally:
        s.close()
    return out


def bench_quality(work: Path, a: argparse.Namespace) -> dict:
    from clipsearch.demo.sample import make_image
    from clipsearch.embed.models import load_clip
    from clipsearch.index import IndexConfig, build_index

    enc = load_clip("clipsearch-tiny", backend="torch")
    results = {}
    for k, profile in enumerate(a.profiles or PROFILES):
        t0 = time.time()
        items = make_items(a.n_quality, profile, seed=10 + k + 1000 * a.seed)
        rng = np.random.default_rng(100 + k + 1000 * a.seed)
        imgs = []
        for s in range(0, len(items), 256):
            batch = [
                make_image(it["color"], it["shape"], it["bg"], rng, size=(96, 96))
                for it in items[s : s + 256]
            ]
            imgs.append(np.asarray(enc.encode_images(batch), dtype=np.float32))
        img = np.concatenate(imgs)
        txt = np.asarray(enc.encode_text([it["caption"] for it in items]), dtype=np.float32)
        emb = work / f"quality-{profile}" / "emb"
        idx = work / f"quality-{profile}" / "index"
        if idx.exists():
            import shutil

            shutil.rmtree(idx.parent)
        write_embeddings(emb, items, img, txt, "clipsearch-tiny", part_rows=2000)
        info = build_index(IndexConfig(embeddings_folder=str(emb), index_folder=str(idx), progress=False))
        queries = make_queries(items, seed=1000 + k + 1000 * a.seed)
        res = evaluate(str(idx), enc, queries)
        res["rows"] = len(items)
        res["index"] = info["indices"]["image"]["factory"]
        res["build_timings"] = info["timings"]
        res["seconds"] = round(time.time() - t0, 1)
        results[profile] = res
        print(profile, json.dumps(res), flush=True)
    return results


# ----------------------------------------------------------------------------------------- 1M: build
def make_speed_embeddings(root: Path, n: int, d: int, model: str, seed: int = 5) -> list[dict]:
    items = make_items(n, "catalog", seed)
    if (root / "manifest.json").exists():
        return items
    rng = np.random.default_rng(seed)
    kc = 2000
    centers = rng.standard_normal((kc, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    gap = rng.standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)
    img = np.empty((n, d), np.float16)
    txt = np.empty((n, d), np.float16)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centers[rng.integers(0, kc, m)] + 0.06 * rng.standard_normal((m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = 0.6 * x + 0.5 * gap + 0.05 * rng.standard_normal((m, d)).astype(np.float32)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        img[s : s + m], txt[s : s + m] = x, t
    write_embeddings(root, items, img, txt, model, part_rows=100_000)
    return items


def _cpu_s() -> float:
    """User + system CPU seconds of this process (every thread) and its finished children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_build(work: Path, a: argparse.Namespace) -> dict:
    from clipsearch.index import IndexConfig, build_index

    emb = work / f"speed-{a.n_speed}-{a.dim}" / "emb"
    idx = work / f"speed-{a.n_speed}-{a.dim}" / "index"
    t0 = time.time()
    make_speed_embeddings(emb, a.n_speed, a.dim, a.model)
    gen_s = time.time() - t0
    cpu: dict[str, float] = {}
    if (idx / "index.json").exists():
        info = json.loads((idx / "index.json").read_text())
        cpu = info.get("cpu_s", {})
    else:
        import shutil

        import clipsearch.keywords.writer as kw_writer

        shutil.rmtree(idx, ignore_errors=True)  # a killed build's parts: measure a whole build
        real = kw_writer.build_keyword_index

        def timed_keywords(*args, **kwargs):  # CPU seconds of the keyword stage (all tantivy's threads)
            c = _cpu_s()
            try:
                return real(*args, **kwargs)
            finally:
                cpu["keywords_s"] = _cpu_s() - c

        kw_writer.build_keyword_index = timed_keywords  # runner imports it at call time
        load0 = sb.uptime()
        c0 = _cpu_s()
        try:
            info = build_index(IndexConfig(embeddings_folder=str(emb), index_folder=str(idx), progress=False))
        finally:
            kw_writer.build_keyword_index = real
        cpu["total_s"] = _cpu_s() - c0
        cpu = {k: round(v, 2) for k, v in cpu.items()}
        info["load_before"], info["cpu_s"] = load0, cpu
    tm = info["timings"]
    kw = float(tm.get("keywords_s", 0.0))
    rest = float(tm["total_s"]) - kw
    out = {"rows": a.n_speed, "dim": a.dim, "generate_s": round(gen_s, 1), "timings": tm, "cpu_s": cpu,
           "factories": {m: e["factory"] for m, e in info["indices"].items()},
           "keywords": info.get("keywords"), "keyword_share_of_rest": round(kw / rest, 4),
           "load_before": info.get("load_before"), "load_after": sb.uptime()}  # fmt: skip
    if cpu.get("keywords_s") is not None:  # CPU time: what load on a shared machine does not inflate
        out["keyword_cpu_share_of_rest"] = round(cpu["keywords_s"] / (cpu["total_s"] - cpu["keywords_s"]), 4)
    print("build", json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------------------- 1M: serve
def speed_prompts(items: list[dict], n: int, seed: int) -> list[str]:
    qs = make_queries(items[:200_000], seed)
    pool = [t for kind in ("rare", "descriptive", "mixed") for t, _ in qs[kind]]
    rng = np.random.default_rng(seed)
    # unique texts (the server caches text embeddings): a counter word CLIP and BM25 both see
    return [f"{pool[int(i)]} {w}" for w, i in enumerate(rng.integers(0, len(pool), n))]


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/knn", json.dumps(body).encode(),
                                 {"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def preread(idx: Path) -> float:
    """Read the files the server maps for text queries into the page cache: a cold HNSW graph on this
    machine's disk costs a random read per visited node (minutes of warm-up), which is not what we measure."""
    t = time.time()
    paths = [idx / "image.index", idx / "metadata.arrow", *sorted((idx / "keywords").iterdir())]
    for path in paths:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass
    return round(time.time() - t, 1)


def bench_serve(work: Path, a: argparse.Namespace) -> dict:
    idx = work / f"speed-{a.n_speed}-{a.dim}" / "index"
    preread_s = preread(idx)
    items = make_items(a.n_speed, "catalog", 5)
    port = sb.free_port()
    log = work / "serve-hybrid.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "clipsearch", "serve", "--index", f"hb={idx}", "--port", str(port),
           "--clip-model", a.model, "--backend", a.backend, "--no-web"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        startup = sb.wait_ready(f"http://127.0.0.1:{port}/healthz", proc, 900, log)
        prompts = speed_prompts(items, 20_000, 77)
        modes = ["semantic", "hybrid", "keyword"]
        for m in modes:  # warm the page cache and the model
            for t in prompts[: a.warmup]:
                _post(port, {"text": t, "k": 10, "mode": m})
        steps: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
        for j, t in enumerate(prompts[a.warmup : a.warmup + a.step_queries]):
            m = modes[j % 3]
            for k, v in _post(port, {"text": t, "k": 10, "mode": m})["timings_ms"].items():
                steps[m].setdefault(k, []).append(v)
        step_p50 = {m: {k: round(float(np.median(v)), 2) for k, v in d.items()} for m, d in steps.items()}
        rounds: dict[str, list[dict]] = {m: [] for m in modes}
        pos = 400
        load0 = sb.uptime()
        for _ in range(a.rounds):
            for m in modes:
                bodies = [{"text": t, "k": 10, "mode": m} for t in prompts[pos : pos + 5000]]
                pos += 5000 if pos + 10_000 < len(prompts) else -pos + 400
                c = sb.cpu_seconds(proc.pid)
                r = sb.load(port, "/knn", bodies, 1, a.duration)
                # the server's CPU per request: load on the machine stretches wall time, not this
                r["server_cpu_ms_per_request"] = round(
                    1000 * (sb.cpu_seconds(proc.pid) - c) / max(1, r["requests"]), 2
                )
                rounds[m].append(r)
                print(m, json.dumps(r), flush=True)
        out = {"preread_s": preread_s, "startup_s": round(startup, 1), "model": a.model, "backend": a.backend, "load_before": load0,
               "load_after": sb.uptime(), "server_steps_p50_ms": step_p50, "rounds": rounds}  # fmt: skip
        med = {m: float(np.median([r["p50_ms"] for r in rs])) for m, rs in rounds.items()}
        out["p50_ms"] = med
        out["hybrid_over_semantic"] = round(med["hybrid"] / med["semantic"], 3)
        # per round (each round runs the three modes back to back, so a ratio within a round shares its load)
        out["hybrid_over_semantic_per_round"] = [
            round(h["p50_ms"] / s["p50_ms"], 3)
            for h, s in zip(rounds["hybrid"], rounds["semantic"], strict=True)
        ]
        cpu = {m: float(np.median([r["server_cpu_ms_per_request"] for r in rs])) for m, rs in rounds.items()}
        out["server_cpu_ms_per_request"] = cpu
        out["hybrid_over_semantic_cpu"] = round(cpu["hybrid"] / cpu["semantic"], 3)
        out["keyword_over_semantic"] = round(med["keyword"] / med["semantic"], 3)
        out["rss_mb"] = sb.rss(proc.pid)
        print("serve", json.dumps(out), flush=True)
        return out
    finally:
        sb.stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/benchdata/hybrid")
    ap.add_argument("--only", choices=("quality", "build", "serve"), action="append")
    ap.add_argument("--n-quality", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=1, help="corpus and query seeds (0: the development corpus)")
    ap.add_argument("--profiles", nargs="*", choices=sorted(PROFILES), default=None)
    ap.add_argument("--n-speed", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--model", default="/work/benchdata/vitb32", help="the served query encoder (--dim wide)")
    ap.add_argument("--backend", default="auto", help="the server's text encoder backend (auto: its default)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=30, help="serve: warm-up queries per mode")
    ap.add_argument(
        "--step-queries", type=int, default=300, help="serve: queries read for the server's step timings"
    )
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    only = a.only or ["quality", "build", "serve"]
    path = work / "results-hybrid.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    for part, fn in (("quality", bench_quality), ("build", bench_build), ("serve", bench_serve)):
        if part in only:
            key = part if part == "quality" else f"{part}-{a.n_speed}-{a.dim}"
            results[key] = fn(work, a)
            path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
