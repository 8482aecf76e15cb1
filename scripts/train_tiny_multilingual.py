#!/usr/bin/env python
"""Distil the tiny CLIP's text tower into a tiny multilingual text encoder (M-CLIP layout), for the demo.

The student is the M-CLIP recipe at a tiny scale: an XLM-RoBERTa-shaped transformer whose token states are
mean-pooled and projected into the tiny CLIP's 64-d space (`LinearTransformation`). It learns, by
distillation, to put a caption in English, French, German, Spanish or Chinese where the teacher (the tiny
CLIP's own text tower) puts the English captions of the same meaning. All seeded, on CPU, offline:

1. Captions come from `clipsearch.demo.languages` (hand-written word lists and templates; no translation
   service). A meaning (colour+shape, colour+shape+background, colour, shape, background, shape+background)
   is drawn, then a language and one of its phrasings. The templates in `languages.HELD_OUT` ("a picture of
   a red circle" and its translations) are never trained on.
2. The target of a meaning is the normalised mean of the teacher's embeddings of every English phrasing of it.
3. A byte-level BPE tokenizer (lower-cased, NFKC, each CJK character a word) is learnt on the five
   languages' captions, so any text tokenizes (unknown words and scripts fall back to bytes).
4. Loss: 1 - cosine(student, target), plus an in-batch InfoNCE over distinct meanings (the student's
   ranking of targets must match); AdamW, warm-up then cosine decay.
5. Evaluation: precision@5 of colour+shape queries ("a red circle" in each language, 48 per language) over
   held-out images generated with a seed no training uses, embedded by the tiny CLIP's image tower; also the
   held-out phrasing, and the teacher's English figure for comparison.

Usage::

    .venv/bin/python scripts/train_tiny_multilingual.py                     # the shipped recipe
    .venv/bin/python scripts/train_tiny_multilingual.py --steps 300 --out /tmp/tml   # a quick try

See docs/tiny_model.md ("The tiny multilingual encoder") for the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipsearch.demo.languages import KINDS, LANGUAGES, canonical, held_out, phrase, templates  # noqa: E402
from clipsearch.demo.sample import BACKGROUNDS, COLORS, SHAPES, make_image, sample_attributes  # noqa: E402

DEFAULT_OUT = ROOT / "src" / "clipsearch" / "demo" / "tiny_multilingual"
MAX_LEN = 40
KIND_P = {"csb": 0.3, "cs": 0.35, "c": 0.08, "s": 0.1, "b": 0.05, "sb": 0.12}


def meanings() -> list[tuple[str, str, str, str]]:
    out = []
    for kind in KINDS:
        for c in COLORS if "c" in kind else ["red"]:
            for s in SHAPES if "s" in kind else ["circle"]:
                for b in BACKGROUNDS if "b" in kind else ["grass"]:
                    out.append((kind, c, s, b))
    return out


def build_tokenizer(out: Path, seed: int):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for kind, c, s, b in meanings():
        for lang in LANGUAGES:
            corpus.extend(templates(lang, kind, c, s, b))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # CJK characters are words of their own (as BERT does): Chinese has no spaces, and merges across a
    # whole sentence would not carry over to a phrasing never seen
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..3, plus the mask
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=MAX_LEN,
    )
    fast.save_pretrained(out)
    # transformers 5 writes its own backend class name; PreTrainedTokenizerFast loads in 4.x and 5.x
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return fast


def _jpeg(img, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _border(img, canvas: int):
    from PIL import Image

    w, h = img.size
    k = canvas / max(w, h)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC if k < 1 else Image.Resampling.BILINEAR)
    out = Image.new("RGB", (canvas, canvas), (0, 0, 0))
    out.paste(img, ((canvas - nw) // 2, (canvas - nh) // 2))
    return out


def heldout_images(n: int, seed: int):
    """The tiny CLIP's held-out protocol: full-size images, a simulated download (256 px border, JPEG 90)."""
    imgs, attrs = [], []
    for i in range(n):
        c, s, b, rng = sample_attributes(i, seed)
        imgs.append(_jpeg(_border(make_image(c, s, b, rng), 256), 90))
        attrs.append((c, s, b))
    return imgs, attrs


def precision_at_5(query_emb: np.ndarray, img_emb: np.ndarray, pairs, attrs) -> float:
    top = np.argsort(-(query_emb @ img_emb.T), axis=1)[:, :5]
    return float(
        np.mean([np.mean([attrs[j][:2] == p for j in row]) for row, p in zip(top, pairs, strict=True)])
    )


def evaluate(encode, teacher, img_emb, attrs) -> dict:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    out = {
        "teacher_en": precision_at_5(
            teacher.encode_text([canonical("en", c, s) for c, s in pairs]), img_emb, pairs, attrs
        )
    }
    for lang in LANGUAGES:
        out[lang] = precision_at_5(encode([canonical(lang, c, s) for c, s in pairs]), img_emb, pairs, attrs)
        out[f"{lang}_held_out_phrasing"] = precision_at_5(
            encode([held_out(lang, c, s) for c, s in pairs]), img_emb, pairs, attrs
        )
    return out


class Student(torch.nn.Module):
    def __init__(self, config, out_dim: int):
        super().__init__()
        from transformers import XLMRobertaModel

        self.transformer = XLMRobertaModel(config)
        self.LinearTransformation = torch.nn.Linear(config.hidden_size, out_dim)

    def forward(self, input_ids, attention_mask):
        states = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        m = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.LinearTransformation((states * m).sum(1) / m.sum(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--teacher", default=str(ROOT / "src" / "clipsearch" / "demo" / "tiny_clip"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--contrastive", type=float, default=0.2, help="weight of the in-batch InfoNCE term")
    p.add_argument("--eval-n", type=int, default=1008, help="held-out images (a multiple of 48 is balanced)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import XLMRobertaConfig

    from clipsearch.embed.models import load_clip

    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_clip(args.teacher, backend="torch")
    all_meanings = meanings()
    targets = {}
    for m in all_meanings:
        e = teacher.encode_text(templates("en", *m))
        v = e.mean(0)
        targets[m] = v / np.linalg.norm(v)
    print(f"teacher: {len(targets)} meanings", flush=True)
    tok = build_tokenizer(out, args.seed)
    vocab = len(tok)
    print(f"tokenizer: {vocab} tokens", flush=True)

    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.width,
        max_position_embeddings=MAX_LEN + 2,
        type_vocab_size=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    student = Student(config, teacher.dim)
    n_params = sum(p.numel() for p in student.parameters())
    print(f"student: {n_params / 1e6:.2f} M parameters", flush=True)

    t0 = time.time()
    imgs, attrs = heldout_images(args.eval_n, args.seed + 2000)
    img_emb = teacher.encode_images(imgs)
    print(f"held-out: {len(imgs)} images in {time.time() - t0:.0f}s", flush=True)

    @torch.no_grad()
    def encode(texts):
        student.eval()
        enc = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        v = F.normalize(student(enc["input_ids"], enc["attention_mask"]), dim=-1).numpy()
        student.train()
        return v

    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng([args.seed, 5])
    kinds = list(KIND_P)
    kind_p = np.array([KIND_P[k] for k in kinds])
    by_kind = {k: [m for m in all_meanings if m[0] == k] for k in kinds}
    history = []
    student.train()
    t_train = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        texts, tgt, ids = [], [], []
        for _ in range(args.batch):
            kind = kinds[int(rng.choice(len(kinds), p=kind_p))]
            m = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
            lang = LANGUAGES[int(rng.integers(len(LANGUAGES)))]
            t = phrase(lang, *m, rng)
            if rng.random() < 0.15:
                t = t[:1].upper() + t[1:]
            texts.append(t)
            tgt.append(targets[m])
            ids.append(all_meanings.index(m))
        enc = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        pred = F.normalize(student(enc["input_ids"], enc["attention_mask"]), dim=-1)
        target = torch.from_numpy(np.stack(tgt)).float()
        loss = (1 - (pred * target).sum(-1)).mean()
        if args.contrastive > 0:
            logits = pred @ target.T / 0.05
            same = torch.from_numpy(
                np.equal.outer(ids, ids)
            ).float()  # captions of one meaning are all positives
            loss = (
                loss
                + args.contrastive
                * -(same / same.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d} loss {loss.item():.4f} lr {lr_at(step):.2e} {time.time() - t_train:.0f}s",
                flush=True,
            )
        if (step + 1) % 500 == 0 and step + 1 < args.steps:
            m = evaluate(encode, teacher, img_emb[:336], attrs[:336])
            history.append({"step": step + 1, **m})
            print(f"  eval@{step + 1} (336 imgs): {json.dumps(m)}", flush=True)
    train_s = time.time() - t_train

    # save in M-CLIP's layout (transformer.* + LinearTransformation), weights in float16
    student.eval()
    state = {
        k: v.detach().half().contiguous() for k, v in student.state_dict().items() if "position_ids" not in k
    }
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tconf = config.to_dict()
    keep = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
            "pad_token_id", "bos_token_id", "eos_token_id", "position_embedding_type")  # fmt: skip
    mclip_cfg = {
        "architectures": ["MultilingualCLIP"],
        "model_type": "M-CLIP",
        "modelBase": "xlm-roberta (tiny, see transformerConfig)",
        "transformerDimensions": args.width,
        "numDims": teacher.dim,
        "transformerConfig": {k: tconf[k] for k in keep if k in tconf},
        "clipModel": "clipsearch-tiny",
    }
    (out / "config.json").write_text(json.dumps(mclip_cfg, indent=2) + "\n")

    from clipsearch.embed.multilingual import load_text_encoder

    reloaded = load_text_encoder(str(out))
    metrics = evaluate(reloaded.encode_text, teacher, img_emb, attrs)
    for lang in LANGUAGES:
        metrics[f"{lang}_ratio_to_teacher_en"] = round(metrics[lang] / metrics["teacher_en"], 4)
    report = {
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "parameters": n_params,
        "vocab_size": vocab,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "heldout_images": len(imgs),
        "metrics": metrics,
        "history": history,
        "model_dir_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6, 2),
    }
    (out / "training_metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
