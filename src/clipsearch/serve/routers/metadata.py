"""POST /metadata: rows by id.

The same path answers clip back's form of the request: a body with `indice_name` (clip back's clients
always send it) gets clip back's answer, `[{"id", "metadata": {...}}]` (routers/clip_back.py); any other body
is clipsearch's `{"index", "ids", "columns"}` -> `{"rows", "missing"}`, as before.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from clipsearch.serve.deps import State
from clipsearch.serve.routers.clip_back import _validation_error, clip_back_metadata, read_json_body
from clipsearch.serve.schemas import MetadataRequest, MetadataResponse

router = APIRouter(tags=["metadata"])


@router.post(
    "/metadata",
    response_model=MetadataResponse,
    summary="Metadata rows of the given ids (with indice_name: clip back's answer)",
    responses={
        400: {"description": "unknown column"},
        404: {"description": "unknown index"},
        422: {"description": "invalid request fields"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MetadataRequest"}}},
        }
    },
)
async def metadata(request: Request, state: State) -> Any:
    data = await read_json_body(request)
    if isinstance(data, dict) and "indice_name" in data:
        return JSONResponse(clip_back_metadata(state, data))
    try:
        body = MetadataRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    return state.metadata(body.index, body.ids, body.columns)
