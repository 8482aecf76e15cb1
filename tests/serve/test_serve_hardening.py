"""Hostile requests get a 4xx that says what was refused, never a 5xx nor a library's words."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.serve import ServeConfig, create_app
from clipsearch.serve.routers.knn import parse_number_array

DEEP = 10_000


@pytest.fixture(scope="module")
def single(index_dir, encoder):
    with TestClient(
        create_app(ServeConfig(indices={"shapes": index_dir}), encoder=encoder), raise_server_exceptions=False
    ) as c:
        yield c


def _no_leaks(text: str) -> None:
    for word in ("Traceback", "Error:", "Exception", "RecursionError", "JSONDecodeError", "IDNA", "C long"):
        assert word not in text, text


@pytest.mark.parametrize(
    "filt",
    [
        "(" * 340 + "width == 1" + ")" * 340,
        ("not " * 500 + "width == 1")[:2000],
        "width == 99999999999999999999999",
        " or ".join(f'caption contains "w{i}"' for i in range(75))[:2000],
    ],
)
def test_hostile_filters_are_400(single, filt):
    r = single.post("/knn", json={"text": "a red circle", "filter": filt})
    assert r.status_code == 400, r.text[:300]
    _no_leaks(r.text)
    assert "limit" in r.text or "range" in r.text


@pytest.mark.parametrize("how", ["form", "multipart"])
def test_deeply_nested_embedding_form_field_is_400(single, how):
    value = "[" * DEEP + "]" * DEEP
    if how == "form":
        r = single.post("/knn", data={"embedding": value})
    else:  # a (None, value) file tuple makes httpx send multipart/form-data with a plain field
        r = single.post("/knn", files={"embedding": (None, value)})
    assert r.status_code == 400, r.text[:300]
    assert "flat JSON array of numbers" in r.json()["detail"]
    _no_leaks(r.text)


def test_deeply_nested_json_body_is_422(single):
    for body in ('{"embedding": ' + "[" * DEEP + "]" * DEEP + "}", "[" * DEEP + "]" * DEEP):
        r = single.post("/knn", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text[:300]
        _no_leaks(r.text)


def test_form_embedding_still_works(single, encoder):
    vec = encoder.encode_text(["a yellow square"])[0]
    r = single.post("/knn", data={"embedding": json.dumps(vec.tolist()), "k": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["caption"] == "a yellow square"


@pytest.mark.parametrize(
    "text,ok",
    [
        ("[1, 2.5, -3e-2, 0]", [1.0, 2.5, -0.03, 0.0]),
        (" [ 1 ] ", [1.0]),
        ("[]", []),
        ("[[1]]", None),
        ('{"a": 1}', None),
        ("[1,]", None),
        ("[NaN]", None),
        ('["1"]', None),
        ("[1 2]", None),
        ("[0x10]", None),
        ("1", None),
        ("[" + ",".join(["1"] * 5000) + "]", None),
    ],
)
def test_parse_number_array(text, ok):
    from clipsearch.errors import InputError

    if ok is None:
        with pytest.raises(InputError):
            parse_number_array("embedding", text)
    else:
        assert np.allclose(parse_number_array("embedding", text), ok)


@pytest.mark.parametrize(
    "url",
    [
        "http://xn--localhost-/",
        "http://xn--/",
        "http://[64:ff9b::7f00:1]/",
        "http://[::127.0.0.1]/",
        "http://a:99999/",
    ],
)
def test_hostile_image_urls_are_4xx_in_every_body_form(single, url):
    for r in (
        single.post("/knn", json={"image_url": url}),
        single.post("/knn", data={"image_url": url}),
        single.post("/knn", files={"image_url": (None, url)}),
    ):
        assert r.status_code in (400, 403), r.text
        _no_leaks(r.text)


# ------------------------------------------------------------------ costly dedup: a per-request row limit
def test_dedup_early_stop_keeps_the_first_rows_exact():
    from clipsearch.serve.dedup import near_duplicates

    rng = np.random.default_rng(3)
    base = rng.standard_normal((700, 16)).astype(np.float32)
    vecs = base[rng.integers(0, 700, 2000)]  # many exact duplicates, scattered
    vecs += rng.standard_normal(vecs.shape).astype(np.float32) * 1e-3
    full = near_duplicates(vecs, 0.95)
    for max_kept in (1, 10, 257, 600):
        part = near_duplicates(vecs, 0.95, max_kept=max_kept)
        kept_full = np.flatnonzero(~full)[:max_kept]
        kept_part = np.flatnonzero(~part)[:max_kept]
        assert kept_full.tolist() == kept_part.tolist()
        last = kept_full[-1]
        assert (full[: last + 1] == part[: last + 1]).all()  # every row up to the last kept one is exact


@pytest.fixture(scope="module")
def dup_client(tmp_path_factory, encoder):
    from .helpers import build_index

    folder = str(tmp_path_factory.mktemp("dups") / "index")
    data = build_index(folder, n=400, encoder=encoder, duplicates=300)  # rows 0..299 hold one image
    app = create_app(ServeConfig(indices={"d": folder}, hygiene_max_candidates=64), encoder=encoder)
    with TestClient(app) as c:
        c.copy = np.asarray(data["image"][0])  # the vector the 300 rows share
        yield c


def test_dedup_beyond_the_candidate_limit_is_a_400_naming_it(dup_client):
    r = dup_client.post(
        "/knn", json={"id": 0, "k": 5}
    )  # 300 copies of the query: 64 candidates cannot fill 5
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "hygiene_max_candidates" in detail and "64" in detail and "deduplicate=false" in detail
    r = dup_client.post("/knn", json={"id": 0, "k": 65})  # over the limit before any search
    assert r.status_code == 400 and "hygiene_max_candidates" in r.json()["detail"]
    r = dup_client.post("/knn", json={"id": 0, "k": 5, "deduplicate": False})
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    far = (-dup_client.copy).tolist()  # the copies rank last for the opposite direction: the page fills
    r = dup_client.post("/knn", json={"embedding": far, "k": 5})
    assert r.status_code == 200 and len(r.json()["results"]) == 5
