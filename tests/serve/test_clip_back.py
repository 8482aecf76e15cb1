"""clip back's API (/knn-service, /metadata with indice_name, /indices-list) driven by the real client:
clip-retrieval 2.45's ClipClient, run in its own venv (scripts/install-test-venvs.sh), against a live server.
Each query must return the same ids, in the same order, as clipsearch's /knn for the same request."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.aesthetic.table import save_table
from clipsearch.serve import ServeConfig, create_app

from .conftest import LiveServer, png_bytes
from .helpers import RGB, FakeEncoder

ROOT = Path(__file__).resolve().parents[2]

FRENCH = {
    "un": "a",
    "rouge": "red",
    "bleu": "blue",
    "vert": "green",
    "cercle": "circle",
    "étoile": "star",
    "carré": "square",
}


class FakeFrench:
    """A 'multilingual' encoder for tests: French words are looked up, then encoded like English."""

    def __init__(self, base: FakeEncoder):
        self.base, self.dim, self.name = base, base.dim, "fake-french"

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        return self.base.encode_text([" ".join(FRENCH.get(w, w) for w in t.lower().split()) for t in texts])


@pytest.fixture(scope="module")
def aesthetic_file(tmp_path_factory, encoder):
    # score s leans toward one colour, so nudging visibly changes the ranking
    colours = ["black", "white", "purple", "orange", "yellow", "blue", "green", "red", "green", "white"]
    table = np.stack([encoder.word(c) / np.linalg.norm(encoder.word(c)) for c in colours]).astype(np.float32)
    path = tmp_path_factory.mktemp("aesthetic") / "aesthetic_embeddings.npy"
    save_table(path, table)
    return str(path)


@pytest.fixture(scope="module")
def settings(index_dir, image_server, aesthetic_file):
    return ServeConfig(
        indices={"shapes": index_dir},
        allow_url_hosts=("127.0.0.1",),
        aesthetic_embeddings=aesthetic_file,
        violent_prompts=("red",),
        peaceful_prompts=("blue", "green", "yellow"),
    )


@pytest.fixture(scope="module")
def live(settings, encoder):
    app = create_app(settings, encoder=encoder, multilingual={"fr": FakeFrench(encoder)})
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def clip_retrieval_python() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-test-venvs.sh"), "clip-retrieval"],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    python = os.path.join(out.stdout.strip().splitlines()[-1], "bin", "python")
    assert os.path.exists(python), out.stderr
    return python


CLIENT = r"""
import json, sys
from clip_retrieval.clip_client import ClipClient, Modality
import clip_retrieval
spec = json.load(sys.stdin)
out = []
for q in spec["queries"]:
    kw = dict(q.get("client", {}))
    kw["modality"] = Modality(kw.pop("modality", "image"))
    client = ClipClient(url=spec["url"] + "/knn-service", indice_name=spec["index"], **kw)
    out.append(client.query(**q["query"]))
print(json.dumps(out))
"""


def run_client(python: str, url: str, queries: list[dict]) -> list:
    proc = subprocess.run(
        [python, "-c", CLIENT],
        input=json.dumps({"url": url, "index": "shapes", "queries": queries}),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def knn_ids(url: str, body: dict) -> list[int]:
    r = httpx.post(url + "/knn", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def test_clip_client_matches_knn(live, clip_retrieval_python, image_server, tmp_path, encoder):
    img = tmp_path / "query.png"
    img.write_bytes(png_bytes(RGB["blue"]))
    emb = encoder.encode_text(["a green star"])[0].tolist()
    plain = {
        "deduplicate": False,
        "use_safety_model": False,
        "use_violence_detector": False,
        "aesthetic_score": None,
        "num_images": 12,
    }
    defaults: dict = {}  # ClipClient's own: dedup, safety, violence on, aesthetic_score 9 at weight 0.5, 40 images
    queries = [
        {"client": plain, "query": {"text": "a red circle"}},
        {"client": plain, "query": {"image": str(img)}},
        {"client": plain, "query": {"embedding_input": emb}},
        {"client": plain, "query": {"image": image_server + "/red.png"}},
        {"client": {**plain, "modality": "text"}, "query": {"text": "a yellow square"}},
        {"client": defaults, "query": {"text": "a purple tree"}},
        {"client": {**plain, "use_mclip": True}, "query": {"text": "un cercle rouge"}},
        {
            "client": {**plain, "aesthetic_score": 6, "aesthetic_weight": 1.0},
            "query": {"text": "a red circle"},
        },
    ]
    got = run_client(clip_retrieval_python, live.url, queries)
    p = {"deduplicate": False, "k": 12}
    full = {
        "deduplicate": True,
        "safety": True,
        "violence": True,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "k": 40,
    }
    expected = [
        {**p, "text": "a red circle"},
        {**p, "image": base64.b64encode(img.read_bytes()).decode()},
        {**p, "embedding": emb},
        {**p, "image_url": image_server + "/red.png"},
        {**p, "text": "a yellow square", "modality": "text"},
        {**full, "text": "a purple tree"},
        {**p, "text": "un cercle rouge", "multilingual": True},
        {**p, "text": "a red circle", "aesthetic_score": 6, "aesthetic_weight": 1.0},
    ]
    for q, res, body in zip(queries, got, expected, strict=True):
        ids = [r["id"] for r in res]
        assert ids == knn_ids(live.url, body), q
        assert len(ids) == body["k"], q
        assert all(list(r)[-2:] == ["id", "similarity"] and {"url", "caption"} <= set(r) for r in res)
    # what each query found is what it asked for (the fake model knows colours and words)
    caps = [[r["caption"] for r in res] for res in got]
    assert all("red" in c for c in caps[0][:5]) and all("blue" in c for c in caps[1][:5])
    assert all("red" in c for c in caps[3][:5]) and caps[6] == caps[0]
    assert caps[0] != caps[7]  # nudging toward score 6 (green) moved the ranking
    # the default client removed violent (red) results, as the detector was told
    assert not any("red" in c for c in caps[5])


def test_response_shape_num_result_ids_and_lists(live):
    body = {
        "text": "a blue star",
        "modality": "image",
        "num_images": 3,
        "num_result_ids": 7,
        "indice_name": "shapes",
    }
    r = httpx.post(
        live.url + "/knn-service", content=json.dumps(body), timeout=30
    )  # no content type, as ClipClient
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res) == 7
    assert all(set(x) == {"url", "caption", "id", "similarity"} for x in res[:3])
    assert all(set(x) == {"id", "similarity"} for x in res[3:])
    assert httpx.get(live.url + "/indices-list").json() == ["shapes"]
    meta = httpx.post(
        live.url + "/metadata", content=json.dumps({"ids": [res[0]["id"], 5], "indice_name": "shapes"})
    )
    assert meta.status_code == 200
    assert [m["id"] for m in meta.json()] == [res[0]["id"], 5]
    assert meta.json()[0]["metadata"] == {"url": res[0]["url"], "caption": res[0]["caption"]}
    assert httpx.post(live.url + "/metadata", json={"ids": [], "indice_name": "shapes"}).json() == []
    native = httpx.post(live.url + "/metadata", json={"ids": [5]}).json()  # clipsearch's own form: unchanged
    assert set(native) == {"rows", "missing"} and native["rows"][0]["id"] == 5


@pytest.fixture(scope="module")
def app_client(settings, encoder):
    with TestClient(create_app(settings, encoder=encoder)) as c:  # no multilingual model
        yield c


@pytest.mark.parametrize(
    "body",
    [
        {"text": "a red circle", "modality": "image", "num_images": "5", "indice_name": "shapes"},
        {"text": "a red circle", "num_images": 5, "aesthetic_score": "", "aesthetic_weight": ""},
        {"text": "a red circle", "num_images": 5, "aesthetic_score": "9", "aesthetic_weight": "0.5"},
        {"text": "", "image": "", "embedding_input": [0.1] * 32, "num_images": 5},
        {"text": "a red circle", "num_images": 5, "deduplicate": "true", "use_safety_model": 1},
        {"text": "a red circle", "num_images": 5000, "num_result_ids": 10000},
        {
            "text": None,
            "image": None,
            "image_url": None,
            "embedding_input": [0.2] * 32,
            "modality": "text",
            "num_images": 3,
        },
        {
            "text": "a red circle",
            "num_images": 5,
            "unknown_field": 1,
            "aesthetic_score": 9,
            "aesthetic_weight": None,
        },
    ],
)
def test_what_clip_back_accepts_is_answered(app_client, body):
    r = app_client.post("/knn-service", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json(), list) and r.json()


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"text": "a red circle", "num_images": 5, "aesthetic_score": 10}, 422, "aesthetic_score"),
        ({"text": "a red circle", "num_images": 5, "aesthetic_score": -1}, 422, "aesthetic_score"),
        (
            {"text": "a red circle", "num_images": 5, "aesthetic_score": 9, "aesthetic_weight": "nan"},
            422,
            "aesthetic_weight",
        ),
        (
            {"text": "a red circle", "num_images": 5, "aesthetic_score": 9, "aesthetic_weight": "inf"},
            422,
            "aesthetic_weight",
        ),
        ({"text": "a red circle", "num_images": 5, "use_mclip": True}, 400, "use_mclip"),
        ({"text": "a red circle", "num_images": 5, "indice_name": "nope"}, 404, "nope"),
        ({"num_images": 5}, 400, "text"),
        ({"text": "a red circle", "num_images": 0}, 422, "num_images"),
        ({"text": "a red circle", "modality": "audio"}, 422, "modality"),
    ],
)
def test_bad_clip_back_input_is_4xx_naming_the_field(app_client, body, status, field):
    r = app_client.post("/knn-service", json=body)
    assert r.status_code == status, r.text
    assert field in r.text


def test_bad_body_is_4xx(app_client):
    for content in (b"", b"not json", b"[1, 2]", b'"x"', b"{" * 5000):
        r = app_client.post("/knn-service", content=content)
        assert 400 <= r.status_code < 500, (content[:20], r.status_code)
    r = app_client.post("/metadata", content=b'{"ids": "x", "indice_name": "shapes"}')
    assert r.status_code == 400 and "ids" in r.text
