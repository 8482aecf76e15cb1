"""Interop check: the same index, built by clip-retrieval, served by clip-retrieval's back and by clipsearch
after `clipsearch import`, must return the same top-10 ids for the same text queries (allowing exact ties).

Run with clipsearch's venv; the reference tools run in their own venv (clip-retrieval 2.45, autofaiss 2.18,
faiss-cpu 1.9, torch 2.14 + torchvision 0.29, numpy<2, setuptools<81):

    .venv/bin/python benchmarks/interop_check.py --venv /work/venvs/clip-retrieval-interop [--n 300]

Steps: a random CLIP in Hugging Face format with the real CLIP BPE tokenizer (both sides load the same
folder: clip-retrieval as `hf_clip:DIR`, clipsearch as `DIR`); generated sample images with captions;
`clip-retrieval inference` then `clip-retrieval index`; `clip-retrieval back` on 127.0.0.1;
`clipsearch import --from clip-retrieval`; clipsearch's server on 127.0.0.1; the same text queries to
both, on the image and the text index. Everything stays on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# builds a random CLIP (HF format) whose tokenizer is the real CLIP BPE shipped by the `clip` package
MAKE_MODEL = r"""
import gzip, json, os, sys
import torch
from transformers import CLIPConfig, CLIPModel, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
out, size = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
import clip as _clip
bpe = os.path.join(os.path.dirname(_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
merges = [tuple(m.split()) for m in merges]
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]; n = 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
vocab = [chr(c) for c in cs]; vocab = vocab + [v + "</w>" for v in vocab]
vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(out, "vocab.json"), "w"))
with open(os.path.join(out, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
tok = CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))
torch.manual_seed(0)
if size == "vitb32":
    cfg = CLIPConfig()
else:  # same structure, a fraction of the compute
    cfg = CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=128,
    )
CLIPModel(cfg).save_pretrained(out)
CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(out)
"""

# clip-retrieval back binds 0.0.0.0 in app.run; this keeps it on loopback
RUN_BACK = r"""
import sys, flask
_run = flask.Flask.run
flask.Flask.run = lambda self, *a, **k: _run(self, host="127.0.0.1", port=k.get("port"), debug=False, use_reloader=False)
from clip_retrieval.clip_back import clip_back
clip_back(indices_paths=sys.argv[1], port=int(sys.argv[2]), clip_model=sys.argv[3], enable_mclip_option=False,
          use_jit=False, provide_aesthetic_embeddings=False, provide_safety_model=False, provide_violence_detector=False)
"""

# `clipsearch import ARGS`, through the import command's own module (the same add_arguments / run)
RUN_IMPORT = r"""
import sys, argparse, logging
logging.basicConfig(level=logging.INFO)
from clipsearch.interop import cli
p = argparse.ArgumentParser(prog="clipsearch import")
cli.add_arguments(p)
sys.exit(cli.run(p.parse_args(sys.argv[1:])))
"""

RUN_CLIPSEARCH = r"""
import sys, logging
logging.basicConfig(level=logging.INFO)
from clipsearch.serve import ServeConfig, serve
serve(ServeConfig(indices={"bench": sys.argv[1]}, host="127.0.0.1", port=int(sys.argv[2]), web=False))
"""

QUERIES = [
    "a red circle", "a blue star", "a green triangle on grass", "a yellow heart", "a purple square",
    "an orange cross on sand", "a white circle in the snow", "a black star against a brick wall",
    "a photo of a red heart on water", "a picture of a blue square on wood", "green cross", "yellow star in the sky",
    "a purple triangle floating on water", "an orange circle on a wooden table", "a white heart", "black square on snow",
    "a red triangle", "blue circle on bricks", "a green heart on a sandy beach", "a photo of a star",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict | list:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except Exception:
            time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout}s; see {log}")


def step(name: str, cmd: list[str], log: Path, env: dict | None = None, timeout: float = 1800) -> float:
    t = time.time()
    print(f"[{name}] {' '.join(cmd[:4])} ...", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    dt = time.time() - t
    print(f"[{name}] {dt:.1f}s", flush=True)
    return dt


def compare(a: list[tuple[int, float]], b: list[tuple[int, float]], tol: float) -> dict:
    """a, b: [(id, similarity)] top-k. Agreement allowing exact ties: wherever the ids differ, the two
    similarities at that rank agree within `tol`, and every id in only one list scores within `tol` of the
    last similarity (so it is tied with what the other list kept)."""
    ia, ib = [i for i, _ in a], [i for i, _ in b]
    exact = ia == ib
    gap = 0.0  # the largest similarity difference that a tie has to explain
    same_len = len(a) == len(b)
    if same_len and not exact:
        gaps = [abs(sx - sy) for (x, sx), (y, sy) in zip(a, b, strict=True) if x != y]
        last = min(a[-1][1], b[-1][1]) if a and b else 0.0
        sims = dict(a) | dict(b)
        gaps += [abs(sims[i] - last) for i in set(ia) ^ set(ib)]
        gap = max(gaps, default=0.0)
    return {
        "exact": exact,
        "agree": exact or (same_len and gap <= tol),
        "tie_gap": gap,
        "overlap": len(set(ia) & set(ib)) / max(1, len(ia)),
        "max_sim_diff": max(
            (abs(sx - sy) for (x, sx), (y, sy) in zip(a, b, strict=False) if x == y), default=0.0
        ),
    }


def build_reference(
    args, vpy: Path, work: Path, model: Path, emb: Path, idx: Path, logs: Path, env: dict, timings: dict
) -> None:
    """The random CLIP, the sample images, then clip-retrieval inference and index (in its venv)."""
    timings["model"] = step(
        "model", [str(vpy), "-c", MAKE_MODEL, str(model), args.model], logs / "model.log", env
    )

    from clipsearch.demo.sample import generate_sample

    images = work / "images"
    rows = generate_sample(images, args.n, seed=7)
    # clip-retrieval's input: webdataset shards of KEY.jpg + KEY.txt (caption) + KEY.json (metadata).
    # (Its `files` reader keys samples by file name with the extension, so it finds no image for a caption.)
    shards = work / "shards"
    shards.mkdir()
    per_shard = max(1, -(-args.n // 3))
    for s in range(0, args.n, per_shard):
        with tarfile.open(shards / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(args.n, s + per_shard)):
                r, key = rows[i], f"{i:09d}"
                meta = {
                    "url": f"http://127.0.0.1/sample/{r['file']}",
                    **{k: r[k] for k in ("color", "shape", "background")},
                }
                for name, data in (
                    (f"{key}.jpg", (images / r["file"]).read_bytes()),
                    (f"{key}.txt", r["caption"].encode()),
                    (f"{key}.json", json.dumps(meta).encode()),
                ):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
    n_shards = len(list(shards.glob("*.tar")))

    cr = str(Path(args.venv) / "bin" / "clip-retrieval")
    timings["clip-retrieval inference"] = step(
        "inference",
        [cr, "inference", "--input_dataset", f"{shards}/{{00000..{n_shards - 1:05d}}}.tar", "--output_folder", str(emb),
         "--input_format", "webdataset",
         "--clip_model", f"hf_clip:{model}", "--enable_text", "True", "--enable_metadata", "True",
         "--batch_size", "32", "--num_prepro_workers", "1", "--output_partition_count", str(n_shards),
         "--use_jit", "False", "--enable_wandb", "False"],
        logs / "inference.log", env,
    )  # fmt: skip
    timings["clip-retrieval index"] = step(
        "index",
        [cr, "index", "--embeddings_folder", str(emb), "--index_folder", str(idx), "--nb_cores", "2"],
        logs / "index.log", env,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--venv", default="/work/venvs/clip-retrieval-interop", help="venv with clip-retrieval 2.45"
    )
    ap.add_argument("--work", default="/tmp/clipsearch-interop-check", help="scratch folder (recreated)")
    ap.add_argument("--n", type=int, default=300, help="generated images")
    ap.add_argument("--model", choices=["small", "vitb32"], default="small", help="size of the random CLIP")
    ap.add_argument("--tol", type=float, default=1e-5, help="similarity difference treated as a tie")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--reuse", action="store_true", help="keep the model and clip-retrieval index of a previous run"
    )
    args = ap.parse_args()

    vpy = Path(args.venv) / "bin" / "python"
    if not vpy.exists():
        raise SystemExit(f"{vpy} not found: create the clip-retrieval venv first (see the module docstring)")
    work = Path(args.work)
    model, emb, idx, out = work / "model", work / "embeddings", work / "cr_index", work / "clipsearch_index"
    reuse = args.reuse and (idx / "image.index").exists()
    if reuse:
        shutil.rmtree(out, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
    timings: dict[str, float] = {}

    if not reuse:
        build_reference(args, vpy, work, model, emb, idx, logs, env, timings)

    timings["clipsearch import"] = step(
        "import",
        [sys.executable, "-c", RUN_IMPORT, "--from", "clip-retrieval", "--source", str(idx),
         "--index-folder", str(out), "--clip-model", str(model), "--no-progress"],
        logs / "import.log", env,
    )  # fmt: skip
    info = json.loads((out / "index.json").read_text())

    paths = work / "indices_paths.json"
    paths.write_text(json.dumps({"bench": {"indice_folder": str(idx), "clip_model": f"hf_clip:{model}"}}))
    back_port, cs_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    results: dict = {}
    try:
        blog, clog = logs / "back.log", logs / "clipsearch_serve.log"
        back = subprocess.Popen(
            [str(vpy), "-c", RUN_BACK, str(paths), str(back_port), f"hf_clip:{model}"],
            stdout=open(blog, "w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        procs.append(back)
        cs = subprocess.Popen(
            [sys.executable, "-c", RUN_CLIPSEARCH, str(out), str(cs_port)],
            stdout=open(clog, "w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        procs.append(cs)
        wait_ready(f"http://127.0.0.1:{back_port}/indices-list", back, 600, blog)
        wait_ready(f"http://127.0.0.1:{cs_port}/healthz", cs, 600, clog)

        per: list[dict] = []
        for modality in ("image", "text"):
            for q in QUERIES:
                rb = post(f"http://127.0.0.1:{back_port}/knn-service", {
                    "text": q, "modality": modality, "num_images": 10, "num_result_ids": 10, "indice_name": "bench",
                    "deduplicate": False, "use_safety_model": False, "use_violence_detector": False, "use_mclip": False,
                    "aesthetic_score": "", "aesthetic_weight": "",
                })  # fmt: skip
                rc = post(f"http://127.0.0.1:{cs_port}/knn", {
                    "text": q, "modality": modality, "k": 10, "deduplicate": False, "index": "bench",
                })  # fmt: skip
                a = [(int(r["id"]), float(r["similarity"])) for r in rb]
                b = [(int(r["id"]), float(r["similarity"])) for r in rc["results"]]
                c = compare(a, b, args.tol)
                # the metadata row of each id must be the same on both sides (row i = faiss id i)
                meta_b = {int(r["id"]): (r.get("url"), r.get("caption")) for r in rb}
                meta_c = {int(r["id"]): (r.get("url"), r.get("caption")) for r in rc["results"]}
                c["metadata_same"] = all(meta_b[i] == meta_c[i] for i in meta_b.keys() & meta_c.keys())
                c.update(query=q, modality=modality, back=[i for i, _ in a], clipsearch=[i for i, _ in b])
                per.append(c)
        n = len(per)
        results = {
            "n_images": args.n,
            "model": args.model,
            "queries": n,
            "agreement": sum(c["agree"] for c in per) / n,
            "exact_order": sum(c["exact"] for c in per) / n,
            "mean_overlap_at_10": sum(c["overlap"] for c in per) / n,
            "max_similarity_diff": max(c["max_sim_diff"] for c in per),
            "max_tie_gap": max(c["tie_gap"] for c in per),
            "metadata_agreement": sum(c["metadata_same"] for c in per) / n,
            "factory": {m: e["factory"] for m, e in info["indices"].items()},
            "search_params": {m: e["search_params"] for m, e in info["indices"].items()},
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "disagreements": [c for c in per if not c["agree"]],
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    print(json.dumps({k: v for k, v in results.items() if k != "disagreements"}, indent=2))
    for c in results.get("disagreements", [])[:5]:
        print("DISAGREE", c["modality"], repr(c["query"]), c["back"], c["clipsearch"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results and results["agreement"] == 1.0 and results["metadata_agreement"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
