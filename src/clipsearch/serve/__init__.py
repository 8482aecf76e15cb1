"""The serve stage: HTTP search over index folders (`serve`) and batch retrieval (`clipsearch.query`).

`serve(ServeConfig(indices={"name": "path/to/index"}, host="127.0.0.1", port=8000))` runs the server
until interrupted. `create_app(settings, encoder=None)` builds the FastAPI app for embedding or tests.
Heavy modules (faiss, the model) load only when the app is created.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from clipsearch.serve.settings import ENV_SETTINGS_JSON, ServeConfig, ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServeConfig", "ServeSettings", "create_app", "serve", "app_from_env"]

logger = logging.getLogger(__name__)


def create_app(
    settings: ServeSettings, encoder: Any = None, multilingual: dict[str, Any] | None = None
) -> FastAPI:
    from clipsearch.serve.app import create_app as _create_app

    return _create_app(settings, encoder, multilingual)


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers: the settings come from the environment."""
    return create_app(ServeSettings.from_env())


def serve(cfg: ServeSettings, encoder: Any = None) -> None:
    """Open the indices, load the model and serve HTTP until interrupted."""
    import uvicorn

    log_level = "info" if logging.getLogger("clipsearch").getEffectiveLevel() <= logging.INFO else "warning"
    url = f"http://{_url_host(cfg.host)}:{cfg.port}/"
    if cfg.workers > 1:
        if encoder is not None:
            logger.warning("an injected encoder is not passed to worker processes; each loads the model")
        # fail fast in this process on bad input, then hand the settings to the workers
        create_app(cfg, encoder)
        os.environ[ENV_SETTINGS_JSON] = cfg.to_json()
        logger.info("serving %s on %s with %d workers", ", ".join(cfg.indices), url, cfg.workers)
        uvicorn.run(
            "clipsearch.serve:app_from_env",
            factory=True,
            host=cfg.host,
            port=cfg.port,
            workers=cfg.workers,
            log_level=log_level,
            access_log=False,
        )
        return
    app = create_app(cfg, encoder)
    metrics_server = None
    if cfg.metrics_listener:
        from clipsearch.serve.metrics import start_metrics_server

        assert cfg.metrics_host is not None
        metrics_server = start_metrics_server(
            app.state.clipsearch.metrics, cfg.metrics_host, cfg.metrics_port
        )
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    extras = [what for what, on in (("web page at /", cfg.web), ("API docs at /docs", cfg.docs)) if on]
    logger.info(
        "serving %s on %s%s", ", ".join(cfg.indices), url, f" ({', '.join(extras)})" if extras else ""
    )
    try:
        server.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
