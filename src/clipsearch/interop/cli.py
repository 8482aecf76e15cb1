"""Convert a clip-retrieval index folder or autofaiss output into a clipsearch index folder, without re-embedding.

Examples:
  clipsearch import --from clip-retrieval --source my_index/ --index-folder out/index --clip-model ViT-B/32
  clipsearch import --from autofaiss --source hf://datasets/fondant-ai/datacomp-small-clip \\
      --index-folder datacomp/index --clip-model laion/CLIP-ViT-B-32-laion2B-s34B-b79K
"""

from __future__ import annotations

import argparse
import json
import logging

from clipsearch.interop.config import LAYOUTS, MODALITIES, TRANSFERS, ImportConfig

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="from_layout",
        choices=LAYOUTS,
        default="auto",
        help="the source's layout (auto: recognise it)",
    )
    p.add_argument(
        "--source",
        required=True,
        help="clip-retrieval index folder (or its back's indices-paths JSON), or an autofaiss index file or "
        "folder; any fsspec path (local, s3://, hf://datasets/...)",
    )
    p.add_argument(
        "--index-folder", required=True, help="the clipsearch index folder to write (new or empty)"
    )
    p.add_argument(
        "--clip-model",
        default=None,
        help="the CLIP model the index was built with (hub name, local folder or open_clip:ARCH/TAG); "
        "required when the source records none",
    )
    p.add_argument(
        "--id-mapping",
        default=None,
        help="autofaiss: the ids parquet file or folder (its 'i' column and id columns such as url); "
        "default: id_mapping/ or ids/ next to the index",
    )
    p.add_argument("--modality", choices=MODALITIES, default="image", help="autofaiss: what the index holds")
    p.add_argument("--indice-name", default=None, help="clip-retrieval back config: which index to import")
    p.add_argument(
        "--transfer",
        choices=TRANSFERS,
        default="copy",
        help="how the faiss file gets into the index folder; hardlink/symlink reuse a local file as is",
    )
    mm = p.add_mutually_exclusive_group()
    mm.add_argument(
        "--mmap",
        dest="mmap",
        action="store_true",
        default=None,
        help="memory-map the index (default: above 1 GiB)",
    )
    mm.add_argument(
        "--no-mmap", dest="mmap", action="store_false", help="load the index into memory to serve it"
    )
    p.add_argument(
        "--url-column", default=None, help="metadata column holding the image URL, if not url/URL/image_url"
    )
    p.add_argument(
        "--caption-column", default=None, help="metadata column holding the caption, if not caption/TEXT"
    )
    p.add_argument(
        "--queries",
        default=None,
        help="held-out text queries (one per line) to tune nprobe/efSearch on; default: keep the index's own",
    )
    p.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@10 the tuned parameters must reach"
    )
    p.add_argument("--max-query-ms", type=float, default=10.0, help="single-query latency budget for tuning")
    p.add_argument("--device", default="cpu", help="device for the model (dimension check, tuning queries)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a clipsearch index already in --index-folder"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-text-index",
        action="store_true",
        help="build no keyword index of the captions (then serve and query answer only mode=semantic)",
    )


def config_from_args(args: argparse.Namespace) -> ImportConfig:
    return ImportConfig(
        source=args.source,
        index_folder=args.index_folder,
        from_layout=args.from_layout,
        clip_model=args.clip_model,
        id_mapping=args.id_mapping,
        modality=args.modality,
        indice_name=args.indice_name,
        transfer=args.transfer,
        mmap=args.mmap,
        url_column=args.url_column,
        caption_column=args.caption_column,
        queries=args.queries,
        target_recall=args.target_recall,
        max_query_ms=args.max_query_ms,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        text_index=not args.no_text_index,
    )


def run(args: argparse.Namespace) -> int:
    from clipsearch.interop.importer import import_index

    cfg = config_from_args(args)
    info = import_index(cfg)
    summary = {
        "index_folder": cfg.index_folder,
        "layout": info["source"]["layout"],
        "model": info["model"],
        "dim": info["dim"],
        "count": info["count"],
        "indices": {
            m: {
                "factory": e["factory"],
                "search_params": e["search_params"],
                "mmap": e["mmap"],
                "reason": e["reason"],
            }
            for m, e in info["indices"].items()
        },
    }
    print(json.dumps(summary, indent=2))
    return 0
