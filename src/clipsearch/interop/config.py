"""`ImportConfig`: everything `clipsearch import` needs, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from clipsearch.errors import ConfigError

LAYOUTS = ("auto", "clip-retrieval", "autofaiss")
MODALITIES = ("image", "text")
TRANSFERS = ("copy", "hardlink", "symlink")


@dataclass(frozen=True)
class ImportConfig:
    """Convert a foreign index (clip-retrieval folder, autofaiss output) into a clipsearch index folder."""

    source: str
    index_folder: str
    from_layout: str = "auto"
    #: the CLIP model the index was built with; required when the source records none
    clip_model: str | None = None
    #: autofaiss: the ids parquet (file or folder); default: id_mapping/ or ids/ next to the index
    id_mapping: str | None = None
    #: autofaiss: which embeddings the single index holds
    modality: str = "image"
    #: clip-retrieval back config JSON with several indices: which one
    indice_name: str | None = None
    #: how the faiss index file gets into the index folder: copy, or link to it (local files only)
    transfer: str = "copy"
    #: memory-map the index at serve time (and open it mapped here); None = when it is larger than 1 GiB
    mmap: bool | None = None
    #: the metadata column holding the image URL / caption when not named `url` / `caption`
    url_column: str | None = None
    caption_column: str | None = None
    #: held-out text queries (a .txt file, one per line) to tune search parameters on; None = keep the index's
    queries: str | None = None
    #: recall@10 the tuned parameters must reach (against exact search)
    target_recall: float = 0.95
    #: single-query latency budget when no point reaches the target recall
    max_query_ms: float = 10.0
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True
    #: a keyword (BM25) index of the captions beside the faiss indices, for mode=keyword|hybrid
    text_index: bool = True

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("no source given", hint="--source PATH")
        if not self.index_folder:
            raise ConfigError("no output index folder given", hint="--index-folder DIR")
        if self.source.rstrip("/") == self.index_folder.rstrip("/"):
            raise ConfigError(
                "the output index folder is the source folder",
                hint="--index-folder DIR (a new, empty folder)",
            )
        if self.from_layout not in LAYOUTS:
            raise ConfigError(
                f"unknown source layout {self.from_layout!r}", hint="--from " + "|".join(LAYOUTS[1:])
            )
        if self.modality not in MODALITIES:
            raise ConfigError(
                f"modality must be image or text, got {self.modality!r}", hint="--modality image"
            )
        if self.transfer not in TRANSFERS:
            raise ConfigError(f"unknown transfer {self.transfer!r}", hint="--transfer " + "|".join(TRANSFERS))
        if self.clip_model is not None and not self.clip_model.strip():
            raise ConfigError("--clip-model is empty", hint="--clip-model NAME_OR_PATH")
        if self.id_mapping is not None and self.from_layout == "clip-retrieval":
            raise ConfigError(
                "--id-mapping is for autofaiss indices; a clip-retrieval folder carries its metadata/ folder",
                hint="drop --id-mapping, or use --from autofaiss",
            )
        if not (0.0 < self.target_recall <= 1.0):
            raise ConfigError(
                f"target recall must be in (0, 1], got {self.target_recall}", hint="--target-recall 0.95"
            )
