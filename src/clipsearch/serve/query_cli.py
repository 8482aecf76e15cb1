"""Batch retrieval by prompts or embeddings into parquet (one row per hit)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, *, pipeline: bool = False) -> None:
    parser.add_argument("--index", required=True, metavar="DIR", help="the index/ folder to search")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompts",
        metavar="FILE",
        help="text file with one prompt per line (or parquet/csv/jsonl); - reads standard input, and a pipe "
        "such as <(...) works",
    )
    src.add_argument(
        "--embeddings", metavar="FILE.npy", help="query vectors, float [n, dim] (- reads standard input)"
    )
    parser.add_argument("-k", type=int, default=10, help="hits per query")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE.parquet", help="where to write the hits"
    )
    parser.add_argument(
        "--filter", default=None, metavar="EXPR", help="metadata filter, e.g. 'caption contains \"dog\"'"
    )
    parser.add_argument(
        "--modality", choices=("image", "text"), default="image", help="search the image or text index"
    )
    parser.add_argument("--columns", default="", help="extra metadata columns to write, comma-separated")
    parser.add_argument(
        "--clip-model", default=None, metavar="NAME_OR_PATH", help="model for prompts (default: index.json)"
    )
    parser.add_argument("--device", default="cpu", help="device for the model")
    parser.add_argument(
        "--multilingual-model",
        default=None,
        metavar="NAME_OR_PATH",
        help="encode the prompts with a multilingual text encoder aligned to the index's CLIP (M-CLIP, "
        "sentence-transformers, multilingual CLIP, clipsearch-tiny-multilingual)",
    )
    parser.add_argument(
        "--aesthetic-score",
        type=int,
        default=None,
        metavar="0-9",
        help="nudge every query toward the images rated at this score (needs aesthetic embeddings)",
    )
    parser.add_argument("--aesthetic-weight", type=float, default=0.5, help="how far to nudge")
    parser.add_argument(
        "--aesthetic-embeddings",
        default=None,
        metavar="FILE",
        help="aesthetic embeddings table (default: the index folder's aesthetic_embeddings.npy)",
    )
    from clipsearch.embed.cli import add_backend_arguments

    add_backend_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=256, help="queries encoded and searched together")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (default: index.json)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW search depth (default: index.json)")
    parser.add_argument(
        "--mode",
        choices=("semantic", "keyword", "hybrid"),
        default="semantic",
        help="semantic: CLIP; keyword: BM25 over the captions; hybrid: both ranked as one (prompts only; "
        "adds score and keyword_score columns)",
    )
    parser.add_argument(
        "--fusion",
        choices=("weighted", "rrf"),
        default="weighted",
        help="how --mode hybrid ranks: IDF-weighted score sum, or reciprocal rank fusion (docs/serve.md)",
    )


def run(args: argparse.Namespace) -> int:
    from clipsearch.query import QueryConfig, query

    cfg = QueryConfig(
        index=args.index,
        output=args.output,
        prompts=args.prompts,
        embeddings=args.embeddings,
        k=args.k,
        modality=args.modality,
        filter=args.filter,
        columns=tuple(c.strip() for c in args.columns.split(",") if c.strip()),
        clip_model=args.clip_model,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        nprobe=args.nprobe,
        efSearch=args.ef_search,
        mode=args.mode,
        fusion=args.fusion,
        multilingual_model=args.multilingual_model,
        aesthetic_score=args.aesthetic_score,
        aesthetic_weight=args.aesthetic_weight,
        aesthetic_embeddings=args.aesthetic_embeddings,
    )
    query(cfg)
    return 0
