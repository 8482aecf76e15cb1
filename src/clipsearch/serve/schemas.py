"""Request and response models of the HTTP API (separate, so internal fields never leak)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

QUERY_INPUTS = ("text", "image", "image_url", "embedding", "id")

# static bounds for the OpenAPI spec; the settings may tighten them per deployment
MAX_K = 1000
MAX_OFFSET = 5_000
MAX_TEXT = 2000
MAX_TEXT_RECEIVED = 100_000  # /knn takes longer texts: keyword and hybrid queries are cut to max_text_chars
MAX_FILTER = 2000
MAX_EMBEDDING_DIM = 4096
MAX_IDS = 10_000
MAX_COLUMNS = 64


class KnnRequest(BaseModel):
    """Exactly one query input (text, image, image_url, embedding or id), plus where and how to search."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "a red circle", "k": 10},
                {"text": "a dog", "filter": 'caption contains "dog" and width >= 512', "deduplicate": True},
            ]
        },
    )

    text: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_RECEIVED,
        description="search by text: at most max_text_chars (2,000) characters in mode semantic (a longer "
        "text is a 400); mode keyword and hybrid cut a longer one to that limit and say so in `notes`",
    )
    image: str | None = Field(
        None, min_length=1, description="search by image: base64 bytes (a data: URL is accepted)"
    )
    image_url: str | None = Field(
        None, min_length=1, max_length=4096, description="search by an image at this URL"
    )
    embedding: list[float] | None = Field(
        None, min_length=1, max_length=MAX_EMBEDDING_DIM, description="search by a query vector"
    )
    id: int | None = Field(None, ge=0, description="more like this: search by the stored vector of this id")
    index: str | None = Field(None, max_length=200, description="index name; optional when one is served")
    modality: Literal["image", "text"] = Field("image", description="search the image or the text index")
    k: int = Field(10, ge=1, le=MAX_K, description="results per page")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="skip this many results (load more)")
    deduplicate: bool = Field(True, description="collapse near-duplicate images")
    dedup_threshold: float | None = Field(None, gt=0.0, le=1.0, description="cosine similarity of duplicates")
    safety: bool = Field(False, description="remove results the zero-shot safety filter flags")
    safety_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    filter: str | None = Field(
        None,
        max_length=MAX_FILTER,
        description='metadata filter, e.g. caption contains "dog" and width >= 512',
    )
    columns: list[str] | None = Field(
        None, max_length=MAX_COLUMNS, description="extra metadata columns to return"
    )
    nprobe: int | None = Field(None, ge=1, le=65536, description="IVF lists to visit (default: index.json)")
    efSearch: int | None = Field(None, ge=1, le=65536, description="HNSW search depth (default: index.json)")
    mode: Literal["semantic", "keyword", "hybrid"] = Field(
        "semantic",
        description="semantic: CLIP; keyword: BM25 over the captions (text queries); hybrid: both ranked as one",
    )
    fusion: Literal["weighted", "rrf"] = Field(
        "weighted", description="how hybrid ranks: IDF-weighted score sum, or reciprocal rank fusion"
    )
    multilingual: bool | str = Field(
        False,
        description="encode the text with the multilingual text encoder (--multilingual-model): true for the "
        "first one served, or its name",
    )
    aesthetic_score: int | None = Field(
        None,
        ge=0,
        le=9,
        description="nudge the query toward the images rated at this score (0-9; needs aesthetic embeddings)",
    )
    aesthetic_weight: float | None = Field(
        None,
        allow_inf_nan=False,
        ge=-100.0,
        le=100.0,
        description="how far to nudge: query + weight x aesthetic embedding (default 0.5)",
    )
    violence: bool | Literal["flag"] = Field(
        False,
        description="zero-shot violence detector: true removes violent results, 'flag' keeps them and adds a "
        "'violent' field to every result",
    )
    violence_threshold: float | None = Field(None, ge=-1.0, le=1.0)

    @field_validator("embedding")
    @classmethod
    def _finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("embedding values must be finite numbers")
        return v

    @field_validator("multilingual", mode="before")
    @classmethod
    def _multilingual(cls, v: Any) -> Any:
        # a form sends "true"/"false" as text: read them as booleans, any other text names a model
        if isinstance(v, str) and v.strip().lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
            "",
        ):
            return v.strip().lower() in ("true", "1", "yes", "on")
        return v

    @model_validator(mode="after")
    def _exactly_one_input(self) -> KnnRequest:
        given = [name for name in QUERY_INPUTS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one query input among text, image, image_url, embedding, id"
                + (f" (got {', '.join(given)})" if given else " (got none)")
            )
        return self


class KnnResult(BaseModel):
    """One hit: id, similarity, url, caption, then the requested metadata columns. Keyword and hybrid
    modes add `score`, `keyword_score` and `highlights`."""

    model_config = ConfigDict(extra="allow")

    id: int
    similarity: float | None = Field(description="cosine similarity (null in keyword mode: no query vector)")
    url: str | None = None
    caption: str | None = None
    score: float | None = Field(None, description="what ranked the hit (keyword and hybrid modes)")
    keyword_score: float | None = Field(None, description="BM25 of the caption, 0 when it does not match")
    highlights: list[list[int]] | None = Field(
        None, description="[start, end) code-point offsets of the caption's matched words"
    )


class Removed(BaseModel):
    """What hygiene removed; `violent` (results the violence detector removed) only when it was asked."""

    model_config = ConfigDict(extra="allow")

    duplicates: int = Field(0, description="near-duplicate images collapsed")
    unsafe: int = Field(0, description="results the safety filter removed")


class KnnResponse(BaseModel):
    results: list[KnnResult]
    index: str
    modality: str
    k: int
    offset: int
    next_offset: int | None = Field(None, description="offset of the next page; null when there is no more")
    removed: Removed
    plan: str = Field(description="how the search ran: ann, exact, exact-subset, ann+filter, ...")
    filter_matches: int | None = Field(None, description="rows the filter allows")
    timings_ms: dict[str, float] = Field(default_factory=dict)
    mode: str = "semantic"
    keyword_query: str | None = Field(None, description="the keyword query as understood")
    notes: list[str] | None = Field(None, description="what the keyword parser ignored (never an error)")
    fusion: str | None = None
    keyword_weight: float | None = Field(None, description="lambda of the weighted fusion for this query")


class ModalityInfo(BaseModel):
    factory: str
    count: int
    mmap: bool
    search_params: dict[str, Any]


class SegmentInfo(BaseModel):
    name: str
    path: str
    offset: int = Field(description="global id of the segment's first row")
    count: int
    uid: str
    deleted: int = Field(description="rows of this segment deleted (tombstones)")


class IndexInfo(BaseModel):
    name: str
    model: str | None
    dim: int
    count: int = Field(description="rows served (deleted rows excluded)")
    modalities: dict[str, ModalityInfo]
    columns: dict[str, str]
    keywords: bool = Field(False, description="whether the index answers mode=keyword and mode=hybrid")
    aesthetic: bool = Field(False, description="whether the index has aesthetic embeddings (aesthetic_score)")
    generation: int | None = Field(None, description="segment manifest generation (segmented indices)")
    deleted: int | None = Field(None, description="rows deleted since the last compaction")
    segments: list[SegmentInfo] | None = Field(None, description="the visible segments, in id order")


class IndicesResponse(BaseModel):
    indices: list[IndexInfo]
    multilingual: list[str] = Field(
        default_factory=list, description="multilingual text encoders served (the `multilingual` field)"
    )
    default: str | None = Field(None, description="the index used when a request names none")


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(min_length=1, max_length=MAX_IDS)
    index: str | None = Field(None, max_length=200)
    columns: list[str] | None = Field(None, max_length=MAX_COLUMNS)


class MetadataResponse(BaseModel):
    rows: list[dict[str, Any]]
    missing: list[int] = Field(default_factory=list, description="requested ids that do not exist")


class HealthResponse(BaseModel):
    status: str
    indices: list[str]
    model: str


class ErrorResponse(BaseModel):
    detail: Any


def multipart_schema(files: bool = True) -> dict[str, Any]:
    """OpenAPI schema of the form bodies of POST /knn: the JSON fields as text, plus (multipart) an `image`
    file."""
    props: dict[str, Any] = {
        "image": {"type": "string", "format": "binary", "description": "the query image file"},
        "text": {"type": "string", "maxLength": MAX_TEXT_RECEIVED},
        "image_url": {"type": "string", "maxLength": 4096},
        "embedding": {"type": "string", "description": "JSON array of floats"},
        "id": {"type": "integer", "minimum": 0},
        "index": {"type": "string", "maxLength": 200},
        "modality": {"type": "string", "enum": ["image", "text"]},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
        "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
        "deduplicate": {"type": "boolean"},
        "dedup_threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "safety": {"type": "boolean"},
        "safety_threshold": {"type": "number", "minimum": -1, "maximum": 1},
        "filter": {"type": "string", "maxLength": MAX_FILTER},
        "columns": {"type": "string", "description": "comma-separated column names"},
        "nprobe": {"type": "integer", "minimum": 1, "maximum": 65536},
        "efSearch": {"type": "integer", "minimum": 1, "maximum": 65536},
        "mode": {"type": "string", "enum": ["semantic", "keyword", "hybrid"]},
        "fusion": {"type": "string", "enum": ["weighted", "rrf"]},
        "multilingual": {"type": "string", "description": "true, false, or a multilingual model's name"},
        "aesthetic_score": {"type": "integer"},
        "aesthetic_weight": {"type": "number"},
        "violence": {"type": "string", "enum": ["true", "false", "flag"]},
        "violence_threshold": {"type": "number", "minimum": -1, "maximum": 1},
    }
    if not files:
        del props["image"]
    return {"type": "object", "properties": props}
