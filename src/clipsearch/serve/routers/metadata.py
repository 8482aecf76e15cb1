"""POST /metadata: rows by id."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from clipsearch.serve.deps import State
from clipsearch.serve.schemas import MetadataRequest, MetadataResponse

router = APIRouter(tags=["metadata"])


@router.post(
    "/metadata",
    response_model=MetadataResponse,
    summary="Metadata rows of the given ids",
    responses={400: {"description": "unknown column"}, 404: {"description": "unknown index"}},
)
def metadata(body: MetadataRequest, state: State) -> dict[str, Any]:
    return state.metadata(body.index, body.ids, body.columns)
