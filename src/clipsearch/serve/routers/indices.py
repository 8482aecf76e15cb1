"""GET /indices: what is served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from clipsearch.serve.deps import State
from clipsearch.serve.schemas import IndicesResponse

router = APIRouter(tags=["indices"])


@router.get(
    "/indices", response_model=IndicesResponse, summary="The served indices, their models and columns"
)
def indices(state: State) -> dict[str, Any]:
    return {
        "indices": [
            {**s.describe(), "aesthetic": name in state.aesthetic} for name, s in state.searchers.items()
        ],
        "default": state.default_index,
        "multilingual": list(state.multilingual),
    }
