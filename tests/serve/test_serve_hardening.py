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
