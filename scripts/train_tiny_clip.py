#!/usr/bin/env python
"""Train the tiny CLIP model shipped in ``src/clipsearch/demo/tiny_clip/`` (Hugging Face ``CLIPModel``).

The demo and the tests have no internet, so they cannot download real CLIP weights. This script
trains a small CLIP on the synthetic images of :mod:`clipsearch.demo.sample` (a coloured shape on a
texture, captioned "a photo of a red circle on grass") so that text->image search over the demo
sample is genuinely meaningful: "a red circle" returns red circles.

What it does, all seeded (``--seed``), on CPU:

1. Builds a small byte-level BPE tokenizer the way CLIP does (the 256 byte symbols, their ``</w>``
   variants, merges learnt over the caption words and a few hundred common English words, then
   ``<|startoftext|>`` and ``<|endoftext|>``). Any text tokenizes: unknown words fall back to bytes.
2. Generates a pool of image+attribute samples in memory, each passed through a simulation of what
   the project does to an image before the model sees it (the download stage: keep-ratio resize to a
   square canvas with a border, JPEG re-encode; then the processor: shortest-edge resize + centre
   crop to 64 px), with random canvas size, border colour, JPEG quality and crops.
3. Trains ``CLIPModel`` with a multi-positive contrastive loss: captions are drawn fresh each step and
   may name all three attributes ("a red star on sand"), two ("red star") or one ("something red",
   "a star"), sometimes with a distractor word; every image in the batch that has the attributes a
   caption names counts as a positive for it (plain CLIP loss would treat the many other red stars
   in a batch as negatives).
4. Evaluates text->image retrieval on held-out images generated at full size (200-640 px) and passed
   through the real ``CLIPProcessor`` after a simulated download (256 px, border, JPEG 90): for
   colour+shape queries ("a red circle") it reports precision@5, i.e. the fraction of the top 5
   images that have that colour AND shape; likewise for colour-only and shape-only queries.
5. Saves model (float16 safetensors, loaded as float32), tokenizer and processor into ``--out`` and
   writes the metrics to ``--out/training_metrics.json``.

Usage::

    .venv/bin/python scripts/train_tiny_clip.py                 # the shipped recipe (~15 min, 2 cores)
    .venv/bin/python scripts/train_tiny_clip.py --steps 200 --out /tmp/tiny   # a quick try

See docs/tiny_model.md for the architecture, the recipe and the measured figures.
"""

from __future__ import annotations

import argparse
import collections
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipsearch.demo.sample import (  # noqa: E402
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    SHAPES,
    _render,
    make_caption,
    make_image,
)

DEFAULT_OUT = ROOT / "src" / "clipsearch" / "demo" / "tiny_clip"
IMAGE_SIZE = 64
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_TEXT_LEN = 32

# --------------------------------------------------------------------------- tokenizer

#: common English words, so that typical queries tokenize into whole words (a model still has to be
#: trained on a word for it to mean anything; these are also used as distractor words in training)
COMMON_WORDS = """
a an the of on in at to with and or for from by is are be this that these those it its my your
some any all no not very more most few many one two three four five six seven eight nine ten
photo photograph picture image images pic shot view close up closeup drawing painting illustration
render icon logo symbol sign shape shapes object objects thing things item something color colour
colored coloured bright dark light pale deep vivid small big large tiny huge little round flat
show me find search looking look want see please give best good nice beautiful pretty cool simple
plain single lone just only top left right middle center centre background foreground outside
inside near next behind over under above below front side day night sunny cloudy summer winter
beach sea ocean lake river pond table floor wall ground field lawn meadow park garden yard house
street road sidewalk city tree trees flower flowers leaf leaves rock stone wooden sandy snowy
grassy watery brick bricks cloud clouds sun moon ice frozen wave waves desert board boards plank
dog cat bird car person people man woman child boy girl face hand ball box toy game card paper
food fruit apple banana cake cup bottle book phone computer chair bed door window room kitchen
pink brown gray grey violet cyan magenta gold golden silver navy teal lime beige
red green blue yellow purple orange white black
circle circles square squares triangle triangles star stars cross crosses heart hearts disk dot
ring rectangle diamond plus oval sphere cube box
grass sand water wood brick sky snow
what where which who how why when here there has have had was were can will would should could
new old big first last long short high low hot cold warm fresh clean dirty wet dry happy cute
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def caption_words() -> list[str]:
    words: set[str] = set(COLORS) | set(SHAPES) | set(BACKGROUNDS)
    for phrases in BACKGROUND_PHRASES.values():
        for p in phrases:
            words.update(p.split())
    templates = [
        *CAPTION_TEMPLATES,
        *CAPTION_TEMPLATES_EXTRA,
        *COLOR_ONLY,
        *SHAPE_ONLY,
        *BG_ONLY,
        *TEMPLATE_WORDS,
    ]
    for template in templates:
        words.update(w for w in template.replace("{", " {").split() if not w.startswith("{"))
    words.update(s + "s" for s in SHAPES)
    return sorted(words)


def learn_bpe(word_freqs: dict[str, int]) -> list[tuple[str, str]]:
    """Plain BPE over byte-level symbols with CLIP's '</w>' end-of-word marker, until every word is
    one symbol. Ties break on the pair itself, so the result is deterministic."""
    b2u = bytes_to_unicode()
    words = {}
    for w, f in word_freqs.items():
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        words[w] = (syms, f)
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter = collections.Counter()
        for syms, f in words.values():
            for a, b in zip(syms, syms[1:], strict=False):
                counts[(a, b)] += f
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        a, b = best
        for w, (syms, f) in words.items():
            if len(syms) < 2:
                continue
            out, i = [], 0
            while i < len(syms):
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = (out, f)
    return merges


def build_tokenizer(out: Path):
    """Write vocab.json + merges.txt, then load them as a CLIPTokenizer and save its full files."""
    from transformers import CLIPTokenizer

    freqs = {w: 10 for w in COMMON_WORDS}
    for w in caption_words():
        freqs[w] = 1000
    merges = learn_bpe(freqs)
    b2u = bytes_to_unicode()
    vocab_list = list(b2u.values())
    vocab_list += [v + "</w>" for v in vocab_list]
    for a, b in merges:
        vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    # a merge result may repeat an existing symbol only if a word equals it; keep the first id
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(
        vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=MAX_TEXT_LEN
    )
    tok.save_pretrained(out)
    return tok


# --------------------------------------------------------------------------- captions

TEMPLATE_WORDS = ["something", "object", "thing", "shape", "shaped", "the", "color", "colour", "of", "on"]
CAPTION_TEMPLATES_EXTRA = [
    "{a} {color} {shape}",
    "{color} {shape}",
    "a photo of {a} {color} {shape}",
    "a picture of {a} {color} {shape}",
    "the {color} {shape}",
    "{a} {color} {shape} shape",
    "{color} {shape}s",
]
COLOR_ONLY = [
    "{color}",
    "something {color}",
    "{a} {color} object",
    "{a} {color} thing",
    "{a} {color} shape",
    "the color {color}",
    "a photo of something {color}",
]
SHAPE_ONLY = [
    "{shape}",
    "a {shape}",
    "a photo of a {shape}",
    "a {shape} shape",
    "the {shape}",
    "{shape}s",
    "a picture of a {shape}",
]
BG_ONLY = ["{bgw}", "a photo of {bgw}", "something {bg}", "an object {bg}"]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_caption(color: str, shape: str, bg: str, rng: np.random.Generator):
    """A caption for an image and the attributes it names: (text, (color|None, shape|None, bg|None))."""
    r = rng.random()
    bgp = BACKGROUND_PHRASES[bg]
    if r < 0.38:
        text, named = make_caption(color, shape, bg, rng), (color, shape, bg)
    elif r < 0.66:
        t = CAPTION_TEMPLATES_EXTRA[int(rng.integers(len(CAPTION_TEMPLATES_EXTRA)))]
        text, named = t.format(a=article(color), color=color, shape=shape), (color, shape, None)
    elif r < 0.75:
        t = COLOR_ONLY[int(rng.integers(len(COLOR_ONLY)))]
        text, named = t.format(a=article(color), color=color), (color, None, None)
    elif r < 0.92:  # shape-only captions: the hardest attribute, so the most frequent single one
        t = SHAPE_ONLY[int(rng.integers(len(SHAPE_ONLY)))]
        text, named = t.format(shape=shape), (None, shape, None)
    elif r < 0.96:
        p = bgp[int(rng.integers(len(bgp)))]
        if rng.random() < 0.5:
            text, named = f"a {shape} {p}", (None, shape, bg)
        else:
            text, named = f"something {color} {p}", (color, None, bg)
    else:
        t = BG_ONLY[int(rng.integers(len(BG_ONLY)))]
        text, named = t.format(bgw=bg, bg=bgp[int(rng.integers(len(bgp)))]), (None, None, bg)
    if rng.random() < 0.1:  # a distractor word the model should learn to ignore
        w = COMMON_WORDS[int(rng.integers(len(COMMON_WORDS)))]
        if w not in (*COLORS, *SHAPES, *BACKGROUNDS) and w + "s" not in SHAPES:
            text = f"{w} {text}" if rng.random() < 0.5 else f"{text} {w}"
    return text, named


# --------------------------------------------------------------------------- images


def _aspect_size(rng: np.random.Generator, long_lo: int, long_hi: int) -> tuple[int, int]:
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16, 5 / 4]))
    long_side = int(rng.integers(long_lo, long_hi + 1))
    if aspect >= 1:
        return long_side, max(8, round(long_side / aspect))
    return max(8, round(long_side * aspect)), long_side


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _border(img: Image.Image, canvas: int, fill) -> Image.Image:
    """The download stage's 'border' resize: fit the long side to canvas, pad to a square."""
    w, h = img.size
    k = canvas / max(w, h)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC if k < 1 else Image.Resampling.BILINEAR)
    out = Image.new("RGB", (canvas, canvas), fill)
    out.paste(img, ((canvas - nw) // 2, (canvas - nh) // 2))
    return out


def _processor_view(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """CLIPImageProcessor: resize the shortest edge to size (bicubic), centre crop size x size."""
    w, h = img.size
    k = size / min(w, h)
    nw, nh = max(size, round(w * k)), max(size, round(h * k))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def training_view(
    color: str, shape: str, bg: str, rng: np.random.Generator, easy: bool = False
) -> np.ndarray:
    """One generated image as the model would see it after download + processor, randomised.

    An easy view (the start of the curriculum) has a big object on a square image and a faint texture.
    """
    if easy:
        side = int(rng.integers(72, 129))
        img = _render(
            color,
            shape,
            bg,
            rng,
            (side, side),
            object_scale=(0.55, 0.8),
            texture=float(rng.uniform(0.1, 0.6)),
        )
        return np.asarray(_processor_view(_jpeg(img, rng.integers(75, 96))), dtype=np.uint8)
    img = make_image(color, shape, bg, rng, size=_aspect_size(rng, 80, 200))
    r = rng.random()
    if r < 0.65:  # download 'border' mode, then the processor
        fill = (
            (0, 0, 0) if rng.random() < 0.7 else ((255, 255, 255) if rng.random() < 0.5 else (128, 128, 128))
        )
        img = _border(img, int(rng.integers(64, 129)), fill)
        img = _jpeg(img, rng.integers(60, 96))
    elif r < 0.9:  # no border (keep ratio / centre crop download modes)
        img = _jpeg(img, rng.integers(60, 96))
    else:  # a mild random crop, as a user-supplied photo might be framed
        w, h = img.size
        k = rng.uniform(0.8, 1.0)
        cw, ch = round(w * k), round(h * k)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = _jpeg(img.crop((x0, y0, x0 + cw, y0 + ch)), rng.integers(60, 96))
    return np.asarray(_processor_view(img), dtype=np.uint8)


def make_pool(n: int, seed: int, easy_frac: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n training views (uint8 [n, 64, 64, 3]) and their attribute ids [n, 3] (colour, shape, bg);
    the first easy_frac of them are easy views."""
    rng = np.random.default_rng([seed, 7])
    n_easy = int(n * easy_frac)
    imgs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    attrs = np.empty((n, 3), np.int64)
    for i in range(n):
        c, s, b = (
            int(rng.integers(len(COLORS))),
            int(rng.integers(len(SHAPES))),
            int(rng.integers(len(BACKGROUNDS))),
        )
        imgs[i] = training_view(COLORS[c], SHAPES[s], BACKGROUNDS[b], rng, easy=i < n_easy)
        attrs[i] = (c, s, b)
    return imgs, attrs


def to_pixels(batch_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- model


def make_config(vocab_size: int, bos_id: int, eos_id: int, args):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=args.text_width,
        intermediate_size=args.text_width * 4,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_width // 32,
        max_position_embeddings=MAX_TEXT_LEN,
        projection_dim=args.embed_dim,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=args.vision_width,
        intermediate_size=args.vision_width * 4,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_width // 32,
        image_size=IMAGE_SIZE,
        patch_size=args.patch,
        projection_dim=args.embed_dim,
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=args.embed_dim
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2D sine-cosine position table [grid*grid, dim] (as in MAE), row-major like the patch order."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        ang = coord[:, None] * omega[None, :]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def init_positions(model) -> None:
    """Start the (learnt) vision position embeddings from a 2D sine-cosine table, so the ViT knows the
    image layout from step 0 instead of discovering it; it learns shapes much sooner."""
    emb = model.vision_model.embeddings
    n_patches = emb.position_embedding.weight.shape[0] - 1
    grid = int(round(n_patches**0.5))
    dim = emb.position_embedding.weight.shape[1]
    table = sincos_2d(grid, dim) * 0.5
    emb.position_embedding.weight[1:] = table
    emb.position_embedding.weight[0] = 0.0


@torch.no_grad()
def init_mimetic(
    model, seed: int = 0, a1: float = 0.7, b1: float = 0.7, a2: float = 0.4, b2: float = 0.4
) -> None:
    """Mimetic initialisation of the vision attention (Trockman & Kolter, 2023): W_q W_k^T ~ a1 Z + b1 I
    per head and W_v W_o ~ a2 Z - b2 I, the structure trained ViTs show. With position embeddings
    that already encode the layout, heads start out attending locally, like a convolution, and a
    small ViT learns shapes from a few thousand images instead of hundreds of thousands."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.vision_model.encoder.layers:
        attn = layer.self_attn
        d = attn.embed_dim
        k = attn.head_dim
        for h in range(attn.num_heads):
            m = a1 * torch.randn(d, d, generator=g) / d**0.5 + b1 * torch.eye(d)
            u, sv, vh = torch.linalg.svd(m)
            root = sv[:k].sqrt()
            # x @ Wq (d x k) with Wq = q_proj.weight[rows].T
            attn.q_proj.weight[h * k : (h + 1) * k] = (u[:, :k] * root).T
            attn.k_proj.weight[h * k : (h + 1) * k] = (vh[:k].T * root).T
        m = a2 * torch.randn(d, d, generator=g) / d**0.5 - b2 * torch.eye(d)
        u, sv, vh = torch.linalg.svd(m)
        root = sv.sqrt()
        attn.v_proj.weight.copy_((u * root).T)
        attn.out_proj.weight.copy_(vh.T * root)


@torch.no_grad()
def init_patch_whitening(model, views_u8: np.ndarray, n_patches: int = 20000, seed: int = 0) -> None:
    """Start the patch embedding from the whitened principal components of real patches (as fast CIFAR
    training does for its first convolution): each output channel starts as a decorrelated,
    unit-variance feature of the pixels instead of random noise."""
    conv = model.vision_model.embeddings.patch_embedding
    hidden, _, p, _ = conv.weight.shape
    g = torch.Generator().manual_seed(seed)
    x = to_pixels(views_u8[torch.randint(len(views_u8), (min(len(views_u8), 2048),), generator=g).numpy()])
    patches = x.unfold(2, p, p).unfold(3, p, p)  # [n, 3, gh, gw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)
    patches = patches[torch.randperm(len(patches), generator=g)[:n_patches]]
    patches = patches - patches.mean(0, keepdim=True)
    cov = patches.T @ patches / len(patches)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    k = min(hidden, evals.numel())
    top = evecs[:, -k:].flip(1) / (evals[-k:].flip(0).clamp_min(1e-4).sqrt())[None, :]
    w = torch.randn(hidden, 3 * p * p, generator=g) * (1.0 / (3 * p * p) ** 0.5) * 0.1
    w[:k] = top.T * 0.5
    conv.weight.copy_(w.reshape(hidden, 3, p, p))


def multi_positive_loss(logits_per_text: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where match[i, j] marks image j as a positive for caption i."""
    m = match.float()  # weights >= 0; each row and column has a positive (the pair itself)
    lt = -(m / m.sum(1, keepdim=True) * F.log_softmax(logits_per_text, dim=1)).sum(1).mean()
    mt = m.t()
    li = -(mt / mt.sum(1, keepdim=True) * F.log_softmax(logits_per_text.t(), dim=1)).sum(1).mean()
    return 0.5 * (lt + li)


# --------------------------------------------------------------------------- evaluation


def heldout_set(n: int, seed: int):
    """Held-out images at full size through a simulated download (256 px border, JPEG 90)."""
    from clipsearch.demo.sample import sample_attributes

    imgs, attrs = [], []
    for i in range(n):
        c, s, b, rng = sample_attributes(i, seed)
        img = make_image(c, s, b, rng)
        imgs.append(_jpeg(_border(img, 256, (0, 0, 0)), 90))
        attrs.append((c, s, b))
    return imgs, attrs


def _features(out) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4 and an output object in transformers 5."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def evaluate(model, processor, imgs, attrs, k: int = 5) -> dict:
    model.eval()
    feats = []
    for i in range(0, len(imgs), 256):
        px = processor(images=imgs[i : i + 256], return_tensors="pt")["pixel_values"]
        feats.append(F.normalize(_features(model.get_image_features(pixel_values=px)), dim=-1))
    img_emb = torch.cat(feats)

    def run(queries: dict[str, callable]) -> float:
        texts = list(queries)
        tok = processor.tokenizer(texts, padding=True, return_tensors="pt")
        t = F.normalize(_features(model.get_text_features(**tok)), dim=-1)
        top = (t @ img_emb.T).topk(k, dim=1).indices
        precs = [np.mean([queries[q](attrs[j]) for j in top[qi].tolist()]) for qi, q in enumerate(texts)]
        return float(np.mean(precs))

    out = {}
    out["color_shape_p@5"] = run(
        {
            f"{article(c)} {c} {s}": (lambda a, c=c, s=s: a[0] == c and a[1] == s)
            for c in COLORS
            for s in SHAPES
        }
    )
    out["color_shape_bare_p@5"] = run(
        {f"{c} {s}": (lambda a, c=c, s=s: a[0] == c and a[1] == s) for c in COLORS for s in SHAPES}
    )
    out["color_shape_bg_p@5"] = run(
        {
            f"{c} {s} {BACKGROUND_PHRASES[b][0]}": (lambda a, c=c, s=s, b=b: a[:3] == (c, s, b))
            for c in COLORS
            for s in SHAPES
            for b in BACKGROUNDS
        }
    )
    out["color_shape_in_bg_query_p@5"] = run(
        {
            f"{c} {s} {BACKGROUND_PHRASES[b][0]}": (lambda a, c=c, s=s: a[0] == c and a[1] == s)
            for c in COLORS
            for s in SHAPES
            for b in BACKGROUNDS
        }
    )
    out["color_only_p@5"] = run({c: (lambda a, c=c: a[0] == c) for c in COLORS})
    out["color_only_phrase_p@5"] = run({f"something {c}": (lambda a, c=c: a[0] == c) for c in COLORS})
    out["shape_only_p@5"] = run({f"a {s}": (lambda a, s=s: a[1] == s) for s in SHAPES})
    out["background_only_p@5"] = run({f"a photo of {b}": (lambda a, b=b: a[2] == b) for b in BACKGROUNDS})
    model.train()
    return out


# --------------------------------------------------------------------------- main


def write_compat_files(out: Path, tok, image_processor) -> None:
    """Files older transformers (4.x) and other tools look for: preprocessor_config.json and
    special_tokens_map.json (transformers 5 folds both into processor/tokenizer configs)."""
    pre = image_processor.to_dict()
    pre["image_processor_type"] = "CLIPImageProcessor"
    pre["processor_class"] = "CLIPProcessor"
    pre.pop("_processor_class", None)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    special = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("tokenizer_class", "CLIPTokenizer")
    cfg["model_max_length"] = MAX_TEXT_LEN
    cfg.update(special)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=6000, help="training views generated up front")
    p.add_argument("--refresh", type=int, default=600, help="views regenerated every 100 steps")
    p.add_argument("--vision-width", type=int, default=96)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=1008, help="held-out images (multiple of 48 is balanced)")
    p.add_argument("--aux", type=float, default=3.0, help="weight of the attribute-classifier loss")
    p.add_argument(
        "--bg-soft", type=float, default=0.3, help="target weight of a right object on another background"
    )
    p.add_argument("--easy", type=float, default=0.5, help="share of easy views in the first pool")
    p.add_argument("--mimetic", type=int, default=1, help="mimetic init of the vision attention")
    p.add_argument("--whiten", type=int, default=1, help="whitened-PCA init of the patch embedding")
    p.add_argument("--hard-frac", type=float, default=0.5, help="share of two-colour batches")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, busy CPU)"
    )
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    t_start = time.time()
    out: Path = args.out
    tok = build_tokenizer(out)
    vocab_size = len(tok.get_vocab())
    print(f"tokenizer: {vocab_size} tokens", flush=True)
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)

    config = make_config(vocab_size, tok.bos_token_id, tok.eos_token_id, args)
    model = CLIPModel(config)
    init_positions(model)
    if args.mimetic:
        init_mimetic(model, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    t0 = time.time()
    # curriculum: the first pool is part easy views; refreshes bring normal views only, so the easy
    # ones fade out as training goes on
    pool, pool_attrs = make_pool(args.pool, args.seed, easy_frac=args.easy)
    print(f"pool: {args.pool} views in {time.time() - t0:.0f}s", flush=True)
    if args.whiten:
        init_patch_whitening(model, pool, seed=args.seed)
    t0 = time.time()
    eval_imgs, eval_attrs = heldout_set(args.eval_n, seed=args.seed + 1000)
    print(f"held-out: {args.eval_n} images in {time.time() - t0:.0f}s", flush=True)

    # training-only attribute classifiers on the image embedding: a direct signal that speeds up
    # learning shapes (contrastive learning alone has to discover them through the text tower)
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(args.embed_dim, n) for n in (len(COLORS), len(SHAPES), len(BACKGROUNDS))]
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.05},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": list(heads.parameters()), "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng([args.seed, 11])
    refresh_rng_seed = 0
    model.train()
    t_train = time.time()
    history = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if rng.random() < args.hard_frac:
            # a batch of only two colours: colour no longer tells captions apart, shape has to
            cols = rng.choice(len(COLORS), size=2, replace=False)
            cand = np.flatnonzero(np.isin(pool_attrs[:, 0], cols))
            idx = rng.choice(cand, size=min(args.batch, len(cand)), replace=False)
        else:
            idx = rng.choice(len(pool), size=args.batch, replace=False)
        views = pool[idx]
        flip = rng.random(len(idx)) < 0.5
        views[flip] = views[flip, :, ::-1]
        a = pool_attrs[idx]
        caps, named = [], []
        for c, s, b in a.tolist():
            text, nm = sample_caption(COLORS[c], SHAPES[s], BACKGROUNDS[b], rng)
            caps.append(text)
            named.append(nm)
        enc = tok(caps, padding=True, truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
        ac = [COLORS[c] for c in a[:, 0]]
        as_ = [SHAPES[s] for s in a[:, 1]]
        ab = [BACKGROUNDS[b] for b in a[:, 2]]
        nc = np.array([n[0] or "" for n in named])
        ns = np.array([n[1] or "" for n in named])
        nb = np.array([n[2] or "" for n in named])
        cs_ok = (nc[:, None] == "") | (nc[:, None] == np.array(ac)[None, :])
        cs_ok &= (ns[:, None] == "") | (ns[:, None] == np.array(as_)[None, :])
        bg_ok = (nb[:, None] == "") | (nb[:, None] == np.array(ab)[None, :])
        # graded targets: for "red circle on grass", a red circle on sand is a weaker positive, so
        # the object outranks the background (a red star on grass is not a positive at all)
        names_object = ((nc != "") | (ns != ""))[:, None]
        match = (cs_ok & bg_ok).astype(np.float32)
        match += (cs_ok & ~bg_ok & names_object).astype(np.float32) * args.bg_soft
        outputs = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=to_pixels(views)
        )
        loss = multi_positive_loss(outputs.logits_per_text, torch.from_numpy(match))
        if args.aux > 0:
            emb = outputs.image_embeds * 10.0
            targets = torch.from_numpy(a)
            aux = sum(
                w * F.cross_entropy(h(emb), targets[:, i])
                for i, (h, w) in enumerate(zip(heads, (0.5, 1.0, 0.5), strict=True))
            )
            loss = loss + args.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(
                f"step {step:5d} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f} lr {lr_at(step):.2e} {el:.0f}s",
                flush=True,
            )
        if (step + 1) % 100 == 0 and args.refresh:
            refresh_rng_seed += 1
            fresh, fresh_attrs = make_pool(args.refresh, args.seed * 100003 + refresh_rng_seed)
            slots = rng.choice(len(pool), size=args.refresh, replace=False)
            pool[slots], pool_attrs[slots] = fresh, fresh_attrs
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate(model, processor, eval_imgs[:336], eval_attrs[:336])
            history.append({"step": step + 1, **m})
            print(f"  eval@{step + 1} (336 imgs): {json.dumps(m)}", flush=True)
    train_s = time.time() - t_train

    # save: float16 weights (halves the files); config dtype float32 so they load as float32
    model.eval()
    model.config.dtype = "float32"
    model.half().save_pretrained(out, safe_serialization=True)
    model.float()
    config_path = out / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    processor.save_pretrained(out)
    write_compat_files(out, tok, image_processor)

    reloaded = CLIPModel.from_pretrained(out)
    reloaded_proc = CLIPProcessor.from_pretrained(out)
    metrics = evaluate(reloaded, reloaded_proc, eval_imgs, eval_attrs)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    report = {
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "parameters": n_params,
        "vocab_size": vocab_size,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "torch_threads": args.threads,
        "heldout_images": args.eval_n,
        "metrics": metrics,
        "history": history,
        "model_dir_mb": round(size_mb, 2),
    }
    (out / "training_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
