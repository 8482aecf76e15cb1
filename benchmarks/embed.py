"""Benchmark `clipsearch embed` against clip-retrieval inference on the same shards, same model, same machine.

    .venv/bin/python benchmarks/embed.py [--n 384] [--shards 2] [--rounds 1] [--out results.json]

It writes N web-like 256 px JPEGs with captions into webdataset shards (the download stage's layout),
saves a ViT-B/32-sized CLIP with random weights (shared/bench/make_vitb32.py, run with the clip-retrieval
venv's python; same compute as the real model), then runs, alternating:
  - clip-retrieval inference (its own venv: --cr-python), hf_clip:MODEL, webdataset input;
  - clipsearch embed (this repo's venv), the same model and shards;
and measures, in a fresh process just before and just after our run, the model-only ceiling: our loaded model on pre-made pixel tensors and
pre-read captions (image + text towers, the same batch size and threads, on min(N, 128) samples), in fp32
and under bf16 autocast; ours is compared with the ceiling at the precision it chose.
It also times `clipsearch embed` with the shipped tiny model when it is there.

With --backends torch,openvino[,onnx] it compares clipsearch's own backends instead (issue 19), in one run:
  - cold: each converted backend once with an empty model cache (the conversion is in the wall time);
  - warm: alternating rounds of `clipsearch embed --backend B` (whole-process images/s, steady rate, the
    encoder's busy share from the part stats);
  - text at batch 1: each backend's loaded model encodes unique prompts one at a time for --text-seconds.
Figures: samples/s for the whole command (wall time, imports and model load included), and for ours also
steady samples/s from the part stats (clip-retrieval's own log rounds its rate to integers, so only its
whole-command figure is used). Load averages are recorded with each run: on a shared machine, compare
figures taken in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "a the red blue green small large dog cat car house tree person bike beach city street food plate "
    "mountain river sky sunset night photo of on with in near old new wooden metal glass two three"
).split()


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def make_shards(folder: Path, n: int, shards: int, seed: int = 0) -> None:
    """Web-like images: 256 px (the download stage's default), gradients and shapes, JPEG q95."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = (n + shards - 1) // shards
    i = 0
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:

            def add(name: str, data: bytes, tar: tarfile.TarFile = tar) -> None:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))

            for r in range(min(per, n - i)):
                key = f"{s:05d}{r:04d}"
                w, h = rng.choice([(256, 256), (256, 192), (192, 256), (256, 171)])
                img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
                d = ImageDraw.Draw(img)
                for _ in range(12):
                    x0, y0 = rng.randrange(w), rng.randrange(h)
                    box = (x0, y0, x0 + rng.randrange(10, 120), y0 + rng.randrange(10, 120))
                    fill = tuple(rng.randrange(256) for _ in range(3))
                    (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                caption = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 16)))
                add(f"{key}.jpg", buf.getvalue())
                add(f"{key}.txt", caption.encode())
                add(
                    f"{key}.json",
                    json.dumps({"key": key, "url": f"http://x/{key}.jpg", "caption": caption}).encode(),
                )
                i += 1


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env).returncode
    return time.perf_counter() - t0, rc


def ceiling_main(model: str, shards: str, n: int, batch: int, threads: int, probe: bool) -> None:
    """(subprocess) the bare model on pre-made tensors: no decoding, no I/O, no writing."""
    import torch

    from clipsearch.embed.models import load_clip

    torch.set_num_threads(threads)
    enc = load_clip(model, device="cpu", precision="fp32")
    caps: list[str] = []
    for t in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(t) as tar:
            caps += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]  # type: ignore[union-attr]
    h, w = enc.preprocessor.output_hw
    pix = torch.randn((batch, 3, h, w), generator=torch.Generator().manual_seed(0))
    res: dict = {"images": n}
    for prec in ("fp32", "bf16") if probe else ("fp32",):
        enc.precision = prec
        enc.image_features(pix)  # warm-up at the full batch shape (kernel selection is per shape)
        enc.text_features(caps[:batch])
        t_img = t_txt = 0.0
        done = 0
        while done < n:
            k = min(batch, n - done)
            t0 = time.perf_counter()
            enc.image_features(pix[:k])
            t1 = time.perf_counter()
            enc.text_features(caps[done : done + k] or ["x"] * k)
            t_txt += time.perf_counter() - t1
            t_img += t1 - t0
            done += k
        res[prec] = {
            "image_and_text_per_s": round(n / (t_img + t_txt), 2),
            "image_only_per_s": round(n / t_img, 2),
            "text_share": round(t_txt / (t_img + t_txt), 3),
        }
    print("CEILING " + json.dumps(res))


def text_bench_main(model: str, backend: str, seconds: str) -> None:
    """(subprocess) unique prompts encoded one at a time, as a server without batching would."""
    import torch

    from clipsearch.embed.models import load_clip

    threads = int(os.environ.get("BENCH_TEXT_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    enc = load_clip(
        model, backend=backend, precision="auto" if backend != "torch" else "fp32", threads=threads
    )
    rng = random.Random(1)
    prompts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12))) + f" {i}" for i in range(100000)
    ]
    for p in prompts[:5]:
        enc.encode_text([p])
    n, t0 = 0, time.perf_counter()
    lat = []
    while time.perf_counter() - t0 < float(seconds):
        t = time.perf_counter()
        enc.encode_text([prompts[5 + n]])
        lat.append(time.perf_counter() - t)
        n += 1
    wall = time.perf_counter() - t0
    res = {"backend": enc.backend, "precision": enc.precision, "threads": threads, "queries": n, "queries_per_s": round(n / wall, 1),
           "p50_ms": round(1000 * statistics.median(lat), 2)}  # fmt: skip
    print("TEXT " + json.dumps(res))


def decode_profile(shards: Path, model: Path, limit: int = 256) -> dict:
    """Where the preprocessing time goes, on one core: decode + resize + crop per image, for the shards' 256 px
    JPEGs and for 1024 px ones (full decode vs the DCT-scaled draft decode the embed stage uses)."""
    from PIL import Image

    from clipsearch.embed.models import make_preprocessor
    from clipsearch.embed.preprocess import decode_batch

    pp = make_preprocessor(str(model))
    data = []
    for t in sorted(shards.glob("*.tar")):
        with tarfile.open(t) as tar:
            data += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]  # type: ignore[union-attr]
    data = data[:limit]
    rng = random.Random(3)
    big = []
    for i in range(32):
        img = Image.effect_noise((1024, 768), 40 + i).convert("RGB").resize((1024, 768))
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (100, 100, 600, 500))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        big.append(buf.getvalue())

    def per_image_ms(pp_, items: list[bytes], reps: int) -> float:
        decode_batch(pp_, items[:4])
        t0 = time.process_time()
        for _ in range(reps):
            decode_batch(pp_, items)
        return round(1000 * (time.process_time() - t0) / (reps * len(items)), 2)

    from dataclasses import replace

    res = {
        "jpeg_256px_ms": per_image_ms(pp, data, 2),
        "jpeg_1024px_draft_ms": per_image_ms(pp, big, 2),
        "jpeg_1024px_full_decode_ms": per_image_ms(replace(pp, draft=False), big, 2),
        "load": loadavg(),
    }
    res["images_per_s_per_worker_256px"] = round(1000 / res["jpeg_256px_ms"], 1)
    return res


def backends_main(a: argparse.Namespace, model: Path, shards: Path, runs: Path) -> int:
    """clipsearch's backends against each other on the same shards and model (issue 19's goals)."""
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["CLIPSEARCH_CACHE_DIR"] = str(runs / "cache")
    base = [str(ROOT / ".venv/bin/python"), "-m", "clipsearch.embed", "-q", "--input-dataset", str(shards),
            "--input-format", "webdataset", "--batch-size", str(a.batch_size), "--device", "cpu", "--no-progress",
            "--clip-model", str(model), *a.extra.split()]  # fmt: skip
    out: dict = {
        "n": a.n,
        "batch_size": a.batch_size,
        "cold": {},
        "warm": {b: [] for b in backends},
        "text": {},
    }

    def one(backend: str, tag: str) -> dict:
        folder = runs / f"{backend}-{tag}"
        before = loadavg()
        wall, rc = timed(
            base + ["--backend", backend, "--output-folder", str(folder)], runs / f"{tag}.log", env
        )
        res: dict = {"wall_s": round(wall, 2), "images_per_s": round(a.n / wall, 2), "rc": rc}
        res["load_before"], res["load_after"] = before, loadavg()
        if rc != 0:
            res["log_tail"] = (runs / f"{tag}.log").read_text()[-2000:]
            return res
        parts = [json.loads(p.read_text()) for p in sorted((folder / "stats").glob("*.json"))]
        rows = sum(p["rows"] for p in parts)
        res["steady_images_per_s"] = round(rows / sum(p["duration_s"] for p in parts), 2)
        res["encoder_busy"] = round(sum(p["model_s"] for p in parts) / sum(p["duration_s"] for p in parts), 3)
        res["precision"] = parts[-1].get("precision")
        res["backend"] = parts[-1].get("backend")
        shutil.rmtree(folder, ignore_errors=True)
        return res

    for b in backends:  # cold: the first start converts the model
        if b != "torch":
            out["cold"][b] = one(b, f"cold-{b}")
            print("cold", b, json.dumps(out["cold"][b]), flush=True)
    for r in range(a.rounds):
        for b in backends if r % 2 == 0 else backends[::-1]:
            res = one(b, f"{b}-{r}")
            out["warm"][b].append(res)
            print("warm", b, json.dumps(res), flush=True)
    out["decode"] = decode_profile(shards, model)
    print("decode", json.dumps(out["decode"]), flush=True)
    for b in backends:
        p = subprocess.run([sys.executable, __file__, "--_textbench", str(model), b, str(a.text_seconds)],
                           capture_output=True, text=True, env=env)  # fmt: skip
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("TEXT ")), None)
        out["text"][b] = json.loads(line[5:]) if line else {"error": p.stderr[-1500:]}
        out["text"][b]["load_before"] = loadavg()
        print("text", b, json.dumps(out["text"][b]), flush=True)

    def med(b: str, key: str) -> float | None:
        v = [r[key] for r in out["warm"][b] if r.get("rc") == 0 and key in r]
        return round(statistics.median(v), 2) if v else None

    summary: dict = {}
    for b in backends:
        summary[b] = {
            "images_per_s": med(b, "images_per_s"),
            "steady_images_per_s": med(b, "steady_images_per_s"),
            "encoder_busy": med(b, "encoder_busy"),
            "text_queries_per_s": out["text"][b].get("queries_per_s"),
        }
    if "torch" in backends:
        t = summary["torch"]
        for b in backends:
            if b != "torch" and t["images_per_s"] and summary[b]["images_per_s"]:
                summary[b]["images_ratio_vs_torch"] = round(summary[b]["images_per_s"] / t["images_per_s"], 2)
            if b != "torch" and t["text_queries_per_s"] and summary[b]["text_queries_per_s"]:
                summary[b]["text_ratio_vs_torch"] = round(
                    summary[b]["text_queries_per_s"] / t["text_queries_per_s"], 2
                )
    out["summary"] = summary
    print(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(runs, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=384, help="images")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs of each tool")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cr-workers", type=int, default=2, help="clip-retrieval num_prepro_workers (<= shards)")
    ap.add_argument("--work", default="/tmp/clipsearch-bench-embed")
    ap.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument(
        "--cr-python",
        default=None,
        help="python of a venv with clip-retrieval (default /work/venvs/clip-retrieval, else -interop)",
    )
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--extra", default="", help="extra clipsearch embed options")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--backends", default="", help="compare these clipsearch backends (e.g. torch,openvino) instead"
    )
    ap.add_argument("--text-seconds", type=float, default=15.0, help="per backend, for text at batch 1")
    ap.add_argument("--_ceiling", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--_textbench", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._textbench:
        text_bench_main(*a._textbench)
        return 0
    if a._ceiling:
        m, s, n, b, t, p = a._ceiling
        ceiling_main(m, s, int(n), int(b), int(t), p == "1")
        return 0

    cr_python = a.cr_python or next(
        (
            p
            for p in (
                "/work/venvs/clip-retrieval/bin/python",
                "/work/venvs/clip-retrieval-interop/bin/python",
            )
            if os.path.exists(p)
        ),
        None,
    )
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = work / f"shards-{a.n}-{a.shards}"
    if not (shards / f"{a.shards - 1:05d}.tar").exists():
        shutil.rmtree(shards, ignore_errors=True)
        make_shards(shards, a.n, a.shards)
    model = work / "vitb32"
    if not (model / "model.safetensors").exists():
        if cr_python is None:
            sys.exit("no clip-retrieval venv to build the ViT-B/32 with (--cr-python)")
        subprocess.run([cr_python, f"{a.bench_dir}/make_vitb32.py", str(model)], check=True)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    if a.backends:
        return backends_main(a, model, shards, runs)
    ours = [
        str(ROOT / ".venv/bin/python"),
        "-m",
        "clipsearch.embed",
        "-q",
        "--input-dataset",
        str(shards),
        "--input-format",
        "webdataset",
        "--batch-size",
        str(a.batch_size),
        "--device",
        "cpu",
        "--no-progress",
        *a.extra.split(),
    ]
    last = f"{a.shards - 1:05d}"
    ref = [
        str(cr_python),
        "-m",
        "clip_retrieval.cli",
        "inference",
        "--input_dataset",
        f"{shards}/{{00000..{last}}}.tar" if a.shards > 1 else f"{shards}/00000.tar",
        "--input_format",
        "webdataset",
        "--clip_model",
        f"hf_clip:{model}",
        "--batch_size",
        str(a.batch_size),
        "--num_prepro_workers",
        str(a.cr_workers),
        "--enable_text",
        "True",
        "--enable_metadata",
        "False",
        "--enable_wandb",
        "False",
        "--use_mclip",
        "False",
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    results: dict[str, list[dict]] = {"clipsearch": [], "clip-retrieval": [], "clipsearch-tiny": []}
    threads = str(len(os.sched_getaffinity(0)))
    ceilings: list[dict] = []

    def run_ceiling() -> None:
        before = loadavg()
        p = subprocess.run(
            [sys.executable, __file__, "--_ceiling", str(model), str(shards), str(min(a.n, 128)),
             str(a.batch_size), threads, "1"],
            capture_output=True,
            text=True,
            env=env,
        )  # fmt: skip
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CEILING ")), None)
        c = json.loads(line[len("CEILING ") :]) if line else {"error": p.stderr[-2000:]}
        c["load_before"] = before
        ceilings.append(c)
        print("ceiling", json.dumps(c), flush=True)

    for r in range(a.rounds):
        order = ("clip-retrieval", "clipsearch") if r % 2 == 0 else ("clipsearch", "clip-retrieval")
        for tool in order:
            if tool == "clip-retrieval" and (a.skip_reference or cr_python is None):
                continue
            out = runs / f"{tool}-{r}"
            before = loadavg()
            if tool == "clipsearch":
                run_ceiling()  # before and after ours: the machine's load drifts, the mean brackets it
                wall, rc = timed(
                    ours + ["--output-folder", str(out), "--clip-model", str(model)],
                    runs / f"{tool}-{r}.log",
                    env,
                )
            else:
                wall, rc = timed(ref + ["--output_folder", str(out)], runs / f"{tool}-{r}.log", env)
            res: dict = {
                "round": r,
                "wall_s": round(wall, 2),
                "samples_per_s": round(a.n / wall, 2),
                "rc": rc,
            }
            res["load_before"], res["load_after"] = before, loadavg()
            log = (runs / f"{tool}-{r}.log").read_text()
            if rc != 0:
                res["log_tail"] = log[-2000:]
            elif tool == "clipsearch":
                parts = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
                rows = sum(p["rows"] for p in parts)
                res["rows"] = rows
                res["steady_samples_per_s"] = round(rows / sum(p["duration_s"] for p in parts), 2)
                res["precision"] = parts[-1].get("precision")
                res["precision_probe"] = parts[-1].get("precision_probe")
            else:
                import numpy as np

                embs = sorted(out.glob("img_emb/*.npy"))
                res["rows"] = int(sum(np.load(e).shape[0] for e in embs))
                rates = re.findall(r"sample_per_sec\W+([0-9.]+)", log)
                if rates:
                    res["steady_samples_per_s_logged"] = float(rates[-1])
            results[tool].append(res)
            print(tool, json.dumps(res), flush=True)
            if tool == "clipsearch":
                run_ceiling()

    if not a.skip_tiny:
        from clipsearch.embed.models import tiny_model_path

        if (tiny_model_path() / "config.json").exists():
            out = runs / "tiny"
            before = loadavg()
            wall, rc = timed(
                ours + ["--output-folder", str(out), "--clip-model", "clipsearch-tiny"],
                runs / "tiny.log",
                env,
            )
            res = {
                "wall_s": round(wall, 2),
                "samples_per_s": round(a.n / wall, 2),
                "rc": rc,
                "load_before": before,
            }
            if rc == 0:
                parts = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
                res["steady_samples_per_s"] = round(
                    sum(p["rows"] for p in parts) / sum(p["duration_s"] for p in parts), 2
                )
            else:
                res["log_tail"] = (runs / "tiny.log").read_text()[-2000:]
            results["clipsearch-tiny"].append(res)
            print("clipsearch-tiny", json.dumps(res), flush=True)

    ceiling = {"runs": ceilings}
    for prec in ("fp32", "bf16"):
        v = [c[prec]["image_and_text_per_s"] for c in ceilings if prec in c]
        if v:
            ceiling[prec] = {"image_and_text_per_s": round(statistics.mean(v), 2)}

    def med(tool: str, key: str) -> float | None:
        v = [r[key] for r in results[tool] if r.get("rc") == 0 and key in r]
        return round(statistics.median(v), 2) if v else None

    summary = {
        "n": a.n,
        "shards": a.shards,
        "batch_size": a.batch_size,
        "threads": int(threads),
        "clipsearch_samples_per_s": med("clipsearch", "samples_per_s"),
        "clipsearch_steady_samples_per_s": med("clipsearch", "steady_samples_per_s"),
        "clip_retrieval_samples_per_s": med("clip-retrieval", "samples_per_s"),
        "clip_retrieval_steady_logged": med("clip-retrieval", "steady_samples_per_s_logged"),
        "tiny_samples_per_s": med("clipsearch-tiny", "samples_per_s"),
        "tiny_steady_samples_per_s": med("clipsearch-tiny", "steady_samples_per_s"),
        "ceiling": ceiling,
    }
    ours_s, ref_s = summary["clipsearch_samples_per_s"], summary["clip_retrieval_samples_per_s"]
    if ours_s and ref_s:
        summary["ratio_vs_clip_retrieval"] = round(ours_s / ref_s, 2)
    precs = [r.get("precision") for r in results["clipsearch"] if r.get("precision")]
    prec = precs[0] if precs else "fp32"
    summary["clipsearch_precision"] = prec
    if prec in ("fp32", "bf16"):
        ceil = ceiling.get(prec, {}).get("image_and_text_per_s")
    else:  # every batch was in the auto-precision measurement (fp32, bf16, bf16, fp32): equal samples each
        r32 = ceiling.get("fp32", {}).get("image_and_text_per_s")
        r16 = ceiling.get("bf16", {}).get("image_and_text_per_s")
        ceil = round(2 / (1 / r32 + 1 / r16), 2) if r32 and r16 else None
    summary["ceiling_same_precision"] = ceil
    summary["ceiling_fp32"] = ceiling.get("fp32", {}).get("image_and_text_per_s")
    steady = summary["clipsearch_steady_samples_per_s"]
    if steady and ceil:
        summary["steady_pct_of_ceiling"] = round(100 * steady / ceil, 1)
    if ours_s and ceil:
        summary["whole_process_pct_of_ceiling"] = round(100 * ours_s / ceil, 1)
    print(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    shutil.rmtree(runs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
