"""GET /healthz, and GET /metrics (Prometheus) unless it has its own listener (`metrics_host`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from clipsearch.serve.deps import State
from clipsearch.serve.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get(
    "/healthz", response_model=HealthResponse, summary="Liveness: the indices are open and the model loaded"
)
def healthz(state: State) -> dict[str, Any]:
    return {"status": "ok", "indices": list(state.searchers), "model": state.model_name}


metrics_router = APIRouter(tags=["health"])


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics: request and per-step latency (encode, search, filter, metadata)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
