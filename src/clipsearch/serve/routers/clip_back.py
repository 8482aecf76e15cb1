"""clip back's API (clip-retrieval 2.45), served beside clipsearch's own, for existing clients.

- `POST /knn-service`: clip back's request fields (`text`, `image`, `image_url`, `embedding_input`, `modality`,
  `num_images`, `num_result_ids`, `indice_name`, `use_mclip`, `aesthetic_score`, `aesthetic_weight`,
  `deduplicate`, `use_safety_model`, `use_violence_detector`), answered with clip back's list of
  `{<metadata columns>, "id", "similarity"}`. The search is /knn's: the same ids, in the same order.
- `POST /metadata` with `indice_name` (clip back's form; see routers/metadata.py) -> `[{"id", "metadata"}]`.
- `GET /indices-list` -> the index names.

Like clip back, the body is read as JSON whatever its content type (clip-retrieval's `ClipClient` sends none),
fields left out take clip back's defaults, an empty text or image counts as absent, and `aesthetic_score`
is ignored for an index that has no aesthetic embeddings. Unlike clip back, what it would crash on is a 4xx
that names the field.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clipsearch.errors import InputError
from clipsearch.serve.deps import State
from clipsearch.serve.schemas import MAX_EMBEDDING_DIM, MAX_TEXT, KnnRequest
from clipsearch.serve.service import Query, _jsonable

logger = logging.getLogger(__name__)

router = APIRouter(tags=["clip back"])

#: clip back's default `columns_to_return`; those the index has are returned, in this order
CLIP_BACK_COLUMNS = ("url", "image_path", "caption", "NSFW")


def _blank_to_none(v: Any) -> Any:
    return None if v == "" else v


class ClipBackKnnRequest(BaseModel):
    """clip back's /knn-service body. Unknown fields are ignored, as clip back does."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, max_length=MAX_TEXT)
    image: str | None = Field(None, description="base64 image bytes")
    image_url: str | None = Field(None, max_length=4096)
    embedding_input: list[float] | None = Field(None, max_length=MAX_EMBEDDING_DIM)
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, description="results with metadata")
    num_result_ids: int | None = Field(None, ge=1, description="results in all (the rest: id and similarity)")
    indice_name: str | None = Field(None, max_length=200)
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | None = Field(None, ge=0, le=9)
    aesthetic_weight: float | None = Field(None, allow_inf_nan=False)

    _blanks = field_validator(
        "text", "image", "image_url", "aesthetic_score", "aesthetic_weight", "num_result_ids", mode="before"
    )(_blank_to_none)

    @field_validator("modality", mode="before")
    @classmethod
    def _modality(cls, v: Any) -> Any:
        return "image" if v is None or v == "" else (v.lower() if isinstance(v, str) else v)

    @field_validator("use_mclip", "deduplicate", "use_safety_model", "use_violence_detector", mode="before")
    @classmethod
    def _flag(cls, v: Any) -> Any:
        return False if v is None or v == "" else v

    @field_validator("embedding_input")
    @classmethod
    def _finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("embedding_input values must be finite numbers")
        return v


def _validation_error(e: ValidationError) -> RequestValidationError:
    errors = []
    for err in e.errors(include_url=False, include_input=False):
        err = dict(err)
        err["loc"] = ("body", *err.get("loc", ()))
        if "ctx" in err:
            err["ctx"] = {k: str(v) for k, v in err["ctx"].items()}
        errors.append(err)
    return RequestValidationError(errors, body=None)


async def read_json_body(request: Request) -> Any:
    """The body as JSON whatever the content type (clip back reads it with get_json(force=True))."""
    body = await request.body()
    if not body.strip():
        raise InputError("the request body is empty: send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise InputError("the request body is not valid JSON") from None


def to_knn(req: ClipBackKnnRequest, max_k: int) -> tuple[KnnRequest, int]:
    """The /knn request that answers a /knn-service one, and how many results carry metadata."""
    query: dict[str, Any] = {}
    # clip back's precedence when several inputs are filled: text, then image, image_url, embedding
    if req.text:
        query["text"] = req.text
    elif req.image:
        query["image"] = req.image
    elif req.image_url:
        query["image_url"] = req.image_url
    elif req.embedding_input:
        query["embedding"] = req.embedding_input
    else:
        raise InputError("give one of text, image, image_url and embedding_input")
    num_images = min(req.num_images, max_k)
    total = min(max(num_images, req.num_result_ids or num_images), max_k)
    knn = KnnRequest.model_validate(
        {
            **query,
            "index": req.indice_name,
            "modality": req.modality,
            "k": total,
            "deduplicate": req.deduplicate,
            "safety": req.use_safety_model,
            "violence": req.use_violence_detector,
            "multilingual": req.use_mclip,
            "aesthetic_score": req.aesthetic_score,
            "aesthetic_weight": req.aesthetic_weight,
        }
    )
    return knn, num_images


def _clip_back_columns(columns: list[str]) -> list[str]:
    return [c for c in CLIP_BACK_COLUMNS if c in columns]


@router.post(
    "/knn-service",
    summary="clip back's search API (clip-retrieval's ClipClient and clip-front talk to it)",
    responses={
        200: {"description": "a list of {url, caption, ..., id, similarity}, best first"},
        400: {"description": "bad input (as /knn)"},
        404: {"description": "unknown indice_name"},
        422: {"description": "a field of the wrong type or out of range (named in loc)"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClipBackKnnRequest"}}},
        }
    },
)
async def knn_service(request: Request, state: State) -> JSONResponse:
    data = await read_json_body(request)
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object")
    try:
        req = ClipBackKnnRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    try:
        knn, num_images = to_knn(req, state.settings.max_k)
    except ValidationError as e:
        raise _validation_error(e) from None
    out = await state.knn(Query(knn, multilingual_field="use_mclip", aesthetic_strict=False))
    s = state.searcher(knn.index)
    cols = _clip_back_columns(list(s.metadata.columns))
    extra = [c for c in cols if c not in ("url", "caption")]
    rows = s.rows([r["id"] for r in out["results"][:num_images]], extra) if extra else []
    results = []
    for i, r in enumerate(out["results"]):
        item: dict[str, Any] = {}
        if i < num_images:
            for c in cols:
                item[c] = r.get(c) if c in ("url", "caption") else _jsonable(rows[i].get(c))
        item["id"] = r["id"]
        item["similarity"] = r["similarity"]
        results.append(item)
    return JSONResponse(results)


@router.get("/indices-list", summary="clip back's list of index names", response_model=list[str])
def indices_list(state: State) -> list[str]:
    return list(state.searchers)


def clip_back_metadata(state: Any, data: dict[str, Any]) -> list[dict[str, Any]]:
    """clip back's /metadata: `{"ids", "indice_name"}` -> `[{"id", "metadata": {...}}]` in the order asked."""
    ids = data.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError("ids must be a list of integers")
    if not ids:
        return []
    if len(ids) > state.settings.max_ids:
        raise InputError(f"at most {state.settings.max_ids} ids per request")
    name = data.get("indice_name")
    if name is not None and not isinstance(name, str):
        raise InputError("indice_name must be a string")
    s = state.searcher(name or None)
    cols = _clip_back_columns(list(s.metadata.columns))
    ok, _bad = s.metadata.valid_ids(ids)
    found = dict(zip(ok, s.rows(ok, cols), strict=True)) if ok else {}
    return [{"id": i, "metadata": {c: _jsonable(v) for c, v in found.get(i, {}).items()}} for i in ids]
