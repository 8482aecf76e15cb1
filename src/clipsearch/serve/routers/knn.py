"""POST /knn: one query input (text, image upload or base64, image_url, embedding, id) -> ranked results.

The body is JSON (`KnnRequest`) or a multipart form with an `image` file and the same fields.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from clipsearch.errors import InputError
from clipsearch.serve.decode import ImageTooLarge
from clipsearch.serve.deps import State
from clipsearch.serve.schemas import MAX_EMBEDDING_DIM, KnnRequest, KnnResponse, multipart_schema
from clipsearch.serve.service import Query

logger = logging.getLogger(__name__)

router = APIRouter(tags=["search"])

_FORM_LISTS = {"columns"}
_FORM_JSON = {"embedding"}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "bad input (unreadable image, unknown column, bad filter, a filter or dedup limit, ...)"
    },
    403: {"description": "image_url refused (its host has no public address)"},
    404: {"description": "unknown index"},
    408: {"description": "image_url took too long"},
    413: {"description": "body, image, pixels or decode memory over the limits"},
    415: {"description": "unsupported content type"},
    422: {"description": "invalid request fields"},
    503: {"description": "too many image queries waiting to be decoded (see Retry-After)"},
}


class UnsupportedMediaType(InputError):
    pass


async def parse_knn(request: Request, max_image_bytes: int) -> Query:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data" or ctype == "application/x-www-form-urlencoded":
        return await _parse_form(request, max_image_bytes)
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not supported: send application/json or multipart/form-data"
        )
    body = await request.body()
    if not body:
        raise InputError('the request body is empty: send a JSON object such as {"text": "a dog"}')
    try:
        return Query(KnnRequest.model_validate_json(body))
    except ValidationError as e:
        raise RequestValidationError(_errors(e), body=None) from None


def _errors(e: ValidationError) -> list[dict[str, Any]]:
    # drop the input echo and context objects: they may be large or not JSON-serialisable
    out = []
    for err in e.errors(include_url=False, include_input=False):
        err = dict(err)
        if "ctx" in err:
            err["ctx"] = {k: str(v) for k, v in err["ctx"].items()}
        out.append(err)
    return out


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_MAX_NUMBER_CHARS = 40  # digits of one float: longer only adds precision a float32 cannot hold


def parse_number_array(key: str, text: str, max_len: int = MAX_EMBEDDING_DIM) -> list[float]:
    """A form field holding a JSON array of numbers (`[0.1, -2e-3]`), parsed without recursion and in
    time linear in its length: nested arrays, objects and anything else are refused with a 400."""
    body = text.strip()
    if len(body) > max_len * (_MAX_NUMBER_CHARS + 2) + 2:
        raise InputError(f"{key} is too long: at most {max_len} numbers")
    if not (body.startswith("[") and body.endswith("]")):
        raise InputError(f"{key} must be a JSON array of numbers, such as [0.1, -0.2]")
    inner = body[1:-1].strip()
    if not inner:
        return []
    items = inner.split(",")
    if len(items) > max_len:
        raise InputError(f"{key} has {len(items)} values, more than the {max_len} limit")
    out = []
    for i, raw in enumerate(items):
        tok = raw.strip()
        if len(tok) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(tok):
            raise InputError(f"{key} must be a flat JSON array of numbers: item {i} is {tok[:20]!r}")
        out.append(float(tok))
    return out


async def _parse_form(request: Request, max_image_bytes: int) -> Query:
    try:
        form = await request.form(max_files=1, max_fields=64, max_part_size=max_image_bytes + 1024)
    except InputError:
        raise
    except Exception as e:  # malformed multipart bodies raise several types
        if getattr(e, "status_code", None) == 413:
            raise
        detail = getattr(e, "detail", None)  # starlette's own words about a limit or a missing boundary
        logger.info("form could not be parsed: %s: %s", type(e).__name__, e)
        raise InputError(
            f"the form could not be parsed: {detail}"
            if isinstance(detail, str)
            else "the form could not be parsed"
        ) from None
    data: dict[str, Any] = {}
    image: bytes | None = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise InputError(f"unexpected file field {key!r}: the image file goes in 'image'")
                image = await value.read(max_image_bytes + 1)
                if len(image) > max_image_bytes:
                    raise ImageTooLarge(f"the image is over the {max_image_bytes} bytes limit")
                continue
            if value == "":
                continue
            if key in _FORM_LISTS:
                data.setdefault(key, []).extend(c.strip() for c in value.split(",") if c.strip())
            elif key in _FORM_JSON:
                data[key] = parse_number_array(key, value)
            elif key in data:
                raise InputError(f"field {key!r} is given twice")
            else:
                data[key] = value
    finally:
        await form.close()
    if image is not None:
        if "image" in data:
            raise InputError("give the image either as a file or as base64, not both")
        data["image"] = "file"  # placeholder so that the one-input rule counts the upload
    try:
        req = KnnRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(_errors(e), body=None) from None
    if image is not None:
        req = req.model_copy(update={"image": None})
    return Query(req, image)


@router.post(
    "/knn",
    response_model=KnnResponse,
    response_model_exclude_unset=True,  # semantic answers keep their fields; keyword/hybrid add theirs
    summary="Search an index by text, image, image URL, embedding or id",
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/KnnRequest"}},
                "multipart/form-data": {"schema": multipart_schema()},
                "application/x-www-form-urlencoded": {"schema": multipart_schema(files=False)},
            },
        }
    },
)
async def knn(request: Request, state: State) -> dict[str, Any]:
    query = await parse_knn(request, state.settings.max_image_bytes)
    return await state.knn(query)
