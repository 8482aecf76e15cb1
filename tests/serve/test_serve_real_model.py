"""The app with the real model loader (clipsearch.embed.models.load_clip) and the shipped tiny model."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from clipsearch.serve import ServeConfig, create_app

from .conftest import png_bytes
from .helpers import build_index


@pytest.fixture(scope="module")
def tiny():
    from clipsearch.embed.models import load_clip

    return load_clip("clipsearch-tiny", device="cpu")


def test_serve_with_the_model_named_in_index_json(tmp_path, tiny):
    folder = str(tmp_path / "index")
    build_index(folder, n=200, dim=tiny.dim, model="clipsearch-tiny", text_factory=None)
    # no encoder injected: the app loads the model that index.json names
    app = create_app(ServeConfig(indices={"tiny": folder}))
    with TestClient(app) as c:
        r = c.post("/knn", json={"text": "a red circle", "k": 5})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 5
        r = c.post(
            "/knn",
            json={"image": base64.b64encode(png_bytes((200, 30, 30))).decode(), "k": 3, "safety": True},
        )
        assert r.status_code == 200, r.text
        assert c.get("/healthz").json()["model"]
