"""FastAPI dependencies as Annotated aliases, so routes stay short and tests can override them."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from clipsearch.serve.service import ServeState


async def get_state(request: Request) -> ServeState:
    return request.app.state.clipsearch


State = Annotated[ServeState, Depends(get_state)]
