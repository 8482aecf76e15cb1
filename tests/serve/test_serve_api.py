from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.errors import ClipsearchError, ConfigError
from clipsearch.serve import ServeConfig, create_app

from .conftest import png_bytes
from .helpers import RGB, FakeEncoder


@pytest.fixture(scope="module")
def client(index_dir, ivf_dir, encoder):
    settings = ServeConfig(
        indices={"shapes": index_dir, "big": ivf_dir},
        safety_threshold=0.3,
        max_body_bytes=2 * 1024 * 1024,
        max_image_bytes=1024 * 1024,
    )
    app = create_app(settings, encoder=encoder)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def single(index_dir, encoder):
    with TestClient(create_app(ServeConfig(indices={"shapes": index_dir}), encoder=encoder)) as c:
        yield c


def test_text_query_returns_fields_and_columns(single):
    r = single.post("/knn", json={"text": "a red circle", "k": 5, "columns": ["width", "key"]})
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["results"]) == 5 and data["index"] == "shapes" and data["modality"] == "image"
    hit = data["results"][0]
    assert set(hit) >= {"id", "similarity", "url", "caption", "width", "key"}
    assert hit["caption"] == "a red circle"
    sims = [h["similarity"] for h in data["results"]]
    assert sims == sorted(sims, reverse=True)
    assert data["timings_ms"]["encode"] >= 0 and "search" in data["timings_ms"]


def test_text_modality_and_index_choice(client):
    r = client.post("/knn", json={"text": "a blue star", "index": "big", "modality": "text", "k": 3})
    assert r.status_code == 200, r.text
    assert all(h["caption"] == "a blue star" for h in r.json()["results"])
    assert client.post("/knn", json={"text": "x"}).status_code == 400  # two indices: name one
    r = client.post("/knn", json={"text": "x", "index": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_paging_load_more_is_consistent(single):
    first = single.post("/knn", json={"text": "a green tree", "k": 10}).json()
    second = single.post(
        "/knn", json={"text": "a green tree", "k": 10, "offset": first["next_offset"]}
    ).json()
    both = single.post("/knn", json={"text": "a green tree", "k": 20}).json()
    ids = [h["id"] for h in first["results"] + second["results"]]
    assert ids == [h["id"] for h in both["results"]]
    assert len(set(ids)) == 20
    last = single.post("/knn", json={"text": "a green tree", "k": 1000, "offset": 1500}).json()
    assert last["next_offset"] is None


def test_deduplicate_collapses_planted_duplicates(single):
    r = single.post("/knn", json={"id": 0, "k": 5, "deduplicate": True}).json()
    ids = [h["id"] for h in r["results"]]
    assert len(set(ids) & {0, 1, 2, 3, 4}) == 1
    assert r["removed"]["duplicates"] == 4
    r = single.post("/knn", json={"id": 0, "k": 5, "deduplicate": False}).json()
    assert sorted(h["id"] for h in r["results"]) == [0, 1, 2, 3, 4]
    assert r["removed"] == {"duplicates": 0, "unsafe": 0}


def test_safety_filter_removes_unsafe_results(client, encoder):
    # a query vector equal to an unsafe prompt's embedding: results near it are flagged when safety is on
    unsafe = encoder.encode_text(["nudity"])[0]
    body = {
        "embedding": unsafe.tolist(),
        "index": "shapes",
        "k": 5,
        "deduplicate": False,
        "safety_threshold": -1.0,
    }
    r = client.post("/knn", json={**body, "safety": True}).json()
    assert r["removed"]["unsafe"] > 0  # threshold -1: everything is flagged
    assert r["results"] == []
    r = client.post("/knn", json={**body, "safety": False}).json()
    assert len(r["results"]) == 5 and r["removed"]["unsafe"] == 0
    # the settings threshold (0.3) keeps ordinary results
    r = client.post("/knn", json={"text": "a red circle", "index": "shapes", "k": 5, "safety": True}).json()
    assert len(r["results"]) == 5


def test_filter_inside_the_search_returns_k(client):
    body = {"text": "a red circle", "index": "big", "k": 10, "filter": "bucket == 3"}
    r = client.post("/knn", json=body).json()
    assert r["plan"] == "exact-subset" and r["filter_matches"] == 20
    assert len(r["results"]) == 10
    rows = client.post(
        "/metadata", json={"index": "big", "ids": [h["id"] for h in r["results"]], "columns": ["bucket"]}
    ).json()
    assert all(row["bucket"] == 3 for row in rows["rows"])
    r = client.post(
        "/knn",
        json={
            "text": "a dog",
            "index": "shapes",
            "k": 10,
            "filter": 'caption contains "dog" and width >= 512',
        },
    ).json()
    assert r["results"] and all("dog" in h["caption"] for h in r["results"])


def test_image_queries_base64_multipart_and_embedding(single, encoder):
    data = png_bytes(RGB["blue"])
    r = single.post("/knn", json={"image": base64.b64encode(data).decode(), "k": 3})
    assert r.status_code == 200, r.text
    assert all("blue" in h["caption"] for h in r.json()["results"])
    r = single.post(
        "/knn", json={"image": "data:image/png;base64," + base64.b64encode(data).decode(), "k": 3}
    )
    assert r.status_code == 200
    r = single.post(
        "/knn",
        files={"image": ("q.png", data, "image/png")},
        data={"k": "3", "modality": "image", "columns": "width,key"},
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and all("blue" in h["caption"] for h in res) and "width" in res[0]
    vec = encoder.encode_text(["a yellow square"])[0]
    r = single.post("/knn", json={"embedding": (vec * 3).tolist(), "k": 2})  # any norm is normalised
    assert r.json()["results"][0]["caption"] == "a yellow square"


def test_micro_batching_encodes_concurrent_text_queries_together(single, encoder):
    app = single.app

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(
                *[c.post("/knn", json={"text": f"a purple house number {i}", "k": 3}) for i in range(16)]
            )
        return [r.status_code for r in rs]

    before = len(encoder.calls)
    assert asyncio.run(burst()) == [200] * 16
    batches = encoder.calls[before:]
    assert sum(batches) == 16 and max(batches) > 1, batches


def test_indices_metadata_healthz_metrics(client):
    r = client.get("/indices").json()
    names = [i["name"] for i in r["indices"]]
    assert names == ["shapes", "big"] and r["default"] is None
    assert r["indices"][0]["columns"]["width"] == "int32"
    assert "path" not in r["indices"][0]
    rows = client.post("/metadata", json={"index": "shapes", "ids": [3, 1, 10**9]}).json()
    assert [row["id"] for row in rows["rows"]] == [3, 1] and rows["missing"] == [10**9]
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/knn", json={"text": "a cat", "index": "shapes", "filter": "width > 100"})
    text = client.get("/metrics").text
    for step in ("encode", "search", "filter", "metadata"):
        assert f'clipsearch_step_seconds_count{{step="{step}"}}' in text
    assert 'clipsearch_requests_total{endpoint="/knn",status="200"}' in text


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({}, 422, "exactly one query input"),
        ({"text": "a", "image_url": "http://x"}, 422, "exactly one"),
        ({"text": ""}, 422, "at least 1"),
        ({"text": "a", "k": 0}, 422, "greater than or equal"),
        ({"text": "a", "k": 100000}, 422, "less than or equal"),
        ({"text": "a", "modality": "audio"}, 422, "image"),
        ({"text": "a", "bogus": 1}, 422, "Extra inputs"),
        ({"text": "a", "filter": "width >>= 3"}, 400, "filter"),
        ({"text": "a", "filter": "nosuch == 1"}, 400, "unknown column"),
        ({"text": "a", "columns": ["nosuch"]}, 400, "unknown column"),
        ({"embedding": [1.0, 2.0]}, 400, "expects 32"),
        ({"embedding": [0.0] * 32}, 400, "non-zero"),
        ({"image": "not base64!!"}, 400, "base64"),
        ({"image": base64.b64encode(b"not an image").decode()}, 400, "could not be decoded"),
        ({"id": 10**9}, 400, "does not exist"),
        ({"image_url": "ftp://x/y.png"}, 400, "http or https"),
    ],
)
def test_bad_requests_get_clear_4xx(single, body, status, fragment):
    r = single.post("/knn", json=body)
    assert r.status_code == status, r.text
    assert fragment in json.dumps(r.json())


def test_malformed_bodies(single):
    assert (
        single.post("/knn", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert single.post("/knn", content=b"", headers={"content-type": "application/json"}).status_code == 400
    assert (
        single.post("/knn", content=b"[1,2]", headers={"content-type": "application/json"}).status_code == 422
    )
    assert single.post("/knn", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    r = single.post(
        "/knn", content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert 400 <= r.status_code < 500
    r = single.post("/knn", files={"other": ("a.png", b"x", "image/png")}, data={"k": "3"})
    assert r.status_code == 400 and "image" in r.json()["detail"]
    r = single.post("/knn", data={"text": "a", "embedding": "[1,"})
    assert r.status_code == 400
    assert single.post("/metadata", json={"ids": []}).status_code == 422
    assert single.post("/metadata", json={"ids": [1], "columns": ["nosuch"]}).status_code == 400


def test_body_and_upload_limits(client):
    big = b"x" * (3 * 1024 * 1024)
    r = client.post("/knn", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post(
        "/knn", files={"image": ("a.png", b"\0" * (1024 * 1024 + 10), "image/png")}, data={"index": "shapes"}
    )
    assert r.status_code == 413 and "limit" in r.text, r.text  # an upload over --max-image-mb

    # a chunked body without Content-Length is counted while it streams
    def gen():
        for _ in range(40):
            yield b"x" * 65536

    r = client.post("/knn", content=gen(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_openapi_documents_knn_inputs(single):
    spec = single.get("/openapi.json").json()
    body = spec["paths"]["/knn"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    props = spec["components"]["schemas"]["KnnRequest"]["properties"]
    assert {
        "text",
        "image",
        "image_url",
        "embedding",
        "filter",
        "deduplicate",
        "safety",
        "k",
        "offset",
    } <= set(props)
    assert single.get("/").status_code == 200 and "clipsearch" in single.get("/").text


def test_startup_errors_are_one_line(tmp_path, index_dir):
    with pytest.raises(ClipsearchError, match="does not exist"):
        create_app(ServeConfig(indices={"x": str(tmp_path / "missing")}), encoder=FakeEncoder())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipsearchError, match="not an index folder"):
        create_app(ServeConfig(indices={"x": str(tmp_path / "empty")}), encoder=FakeEncoder())
    with pytest.raises(ConfigError, match="64-d vectors") as e:
        create_app(ServeConfig(indices={"x": index_dir}), encoder=FakeEncoder(64))
    assert "--clip-model" in e.value.one_line()
    with pytest.raises(ConfigError, match="no index"):
        create_app(ServeConfig(indices={}), encoder=FakeEncoder())
    with pytest.raises(ConfigError):
        ServeConfig(indices={"bad name": index_dir})


def test_query_vector_normalisation_of_embedding(single):
    """An embedding is a direction: 1e-30 * e0 answers exactly as e0 does; the zero vector has none."""
    unit = np.zeros(32)
    unit[0] = 1.0
    r = single.post("/knn", json={"embedding": unit.tolist(), "k": 10})
    assert r.status_code == 200, r.text
    tiny = single.post("/knn", json={"embedding": (unit * 1e-30).tolist(), "k": 10})
    assert tiny.status_code == 200, tiny.text
    got = [(h["id"], round(h["similarity"], 5)) for h in tiny.json()["results"]]
    assert got == [(h["id"], round(h["similarity"], 5)) for h in r.json()["results"]] and len(got) == 10
    r = single.post("/knn", json={"embedding": [0.0] * 32})
    assert r.status_code == 400 and "non-zero" in r.text
