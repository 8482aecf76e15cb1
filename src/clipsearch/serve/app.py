"""The FastAPI app: `create_app(settings, encoder=None)`.

Indices are opened and the model loaded when the app is created, so bad startup input fails at once with
a one-line ClipsearchError. Every malformed request gets a 4xx with a clear message.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipsearch import __version__
from clipsearch.errors import ClipsearchError
from clipsearch.serve.routers import clip_back, health, indices, knn, metadata, web
from clipsearch.serve.schemas import KnnRequest, MetadataRequest
from clipsearch.serve.service import NotFound, ServeState
from clipsearch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

_ENDPOINTS = {"/knn", "/metadata", "/indices", "/healthz", "/metrics", "/", "/knn-service", "/indices-list"}


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the {limit} bytes limit")


class LimitsAndMetrics:
    """Pure ASGI middleware: caps the request body (413) and records request counts and latency."""

    def __init__(self, app: ASGIApp, state: ServeState):
        self.app = app
        self.state = state
        self.limit = state.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        status = {"code": 500}
        t0 = time.perf_counter()
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_json(
                        send, 413, {"detail": f"the request body is over the {self.limit} bytes limit"}
                    )
                    self.state.metrics.requests.labels(endpoint, "413").inc()
                    return
        seen = 0
        limit = self.limit

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        async def tracking_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        finally:
            m = self.state.metrics
            m.requests.labels(endpoint, str(status["code"])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _error_status(e: ClipsearchError) -> int:
    status = getattr(e, "status", None)  # ImageFetchError, DecodeBusy (503), DecodeTooCostly (413)
    if isinstance(status, int):
        return status
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, knn.UnsupportedMediaType):
        return 415
    return 400


def create_app(
    settings: ServeSettings, encoder: Any = None, multilingual: dict[str, Any] | None = None
) -> FastAPI:
    """Build the app. `encoder` (anything with .name, .dim, .encode_text, .encode_images) replaces
    the model named by the settings or index.json; `multilingual` ({alias: anything with .dim and
    .encode_text}) replaces the settings' multilingual models; tests pass small fake ones."""
    state = ServeState.open(settings, encoder, multilingual)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        # Everything loaded so far (model, tokenizer, indices, routes) lives as long as the server: move it
        # out of the collector's view, so that full collections under load scan only request garbage
        # (measured: the worst p99 of 300 q/s runs fell from 118-265 ms to 51-89 ms).
        gc.collect()
        gc.freeze()
        yield
        await state.aclose()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="clipsearch",
        version=__version__,
        description="CLIP semantic search over indices built by the clipsearch pipeline.",
        lifespan=lifespan,
        **docs,
    )
    app.state.clipsearch = state

    @app.exception_handler(ClipsearchError)
    async def _clipsearch_error(request: Request, exc: ClipsearchError) -> JSONResponse:
        retry = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(retry)} if retry else None
        return JSONResponse({"detail": exc.one_line()}, status_code=_error_status(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            err = {k: v for k, v in dict(err).items() if k in ("type", "loc", "msg")}
            errors.append(err)
        return JSONResponse({"detail": errors}, status_code=422)

    app.include_router(knn.router)
    app.include_router(indices.router)
    app.include_router(metadata.router)
    app.include_router(health.router)
    app.include_router(clip_back.router)
    if settings.metrics_on_api:
        app.include_router(health.metrics_router)
    if settings.web:
        app.include_router(web.router)
        app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    app.add_middleware(LimitsAndMetrics, state=state)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        knn_schema = KnnRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in knn_schema.pop("$defs", {}).items():
            comps.setdefault(name, sub)
        comps["KnnRequest"] = knn_schema
        for model in (MetadataRequest, clip_back.ClipBackKnnRequest):
            sub_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in sub_schema.pop("$defs", {}).items():
                comps.setdefault(name, sub)
            comps[model.__name__] = sub_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
