"""/knn's multilingual, aesthetic and violence fields, with fake encoders whose geometry is known."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.aesthetic.table import save_table
from clipsearch.errors import ConfigError
from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder
from .test_clip_back import FakeFrench


@pytest.fixture(scope="module")
def table_path(tmp_path_factory, encoder):
    rows = [encoder.word(c) / np.linalg.norm(encoder.word(c)) for c in ["black"] * 9 + ["green"]]
    path = tmp_path_factory.mktemp("aes") / "table.npy"
    save_table(path, np.stack(rows))
    return str(path)


@pytest.fixture(scope="module")
def client(index_dir, encoder, table_path):
    settings = ServeConfig(
        indices={"shapes": index_dir},
        aesthetic_embeddings=table_path,
        violent_prompts=("red",),
        peaceful_prompts=("blue", "green", "yellow", "black"),
    )
    app = create_app(
        settings, encoder=encoder, multilingual={"fr": FakeFrench(encoder), "fr2": FakeFrench(encoder)}
    )
    with TestClient(app) as c:
        yield c


def caps(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [h["caption"] for h in r.json()["results"]]


def test_multilingual_field_picks_the_encoder(client):
    en = client.post("/knn", json={"text": "red circle", "k": 8, "deduplicate": False}).json()["results"]
    fr = client.post(
        "/knn", json={"text": "rouge cercle", "k": 8, "multilingual": True, "deduplicate": False}
    )
    assert [h["id"] for h in fr.json()["results"]] == [h["id"] for h in en]
    by_name = client.post(
        "/knn", json={"text": "rouge cercle", "k": 8, "multilingual": "fr2", "deduplicate": False}
    )
    assert [h["id"] for h in by_name.json()["results"]] == [h["id"] for h in en]
    # without it, the French words mean nothing to the index's own (English) model
    plain = client.post("/knn", json={"text": "rouge cercle", "k": 8, "deduplicate": False})
    assert [h["id"] for h in plain.json()["results"]] != [h["id"] for h in en]
    form = client.post(
        "/knn", data={"text": "rouge cercle", "k": "8", "multilingual": "true", "deduplicate": "false"}
    )
    assert [h["id"] for h in form.json()["results"]] == [h["id"] for h in en]
    r = client.post("/knn", json={"text": "rouge", "multilingual": "klingon"})
    assert r.status_code == 400 and "multilingual" in r.text and "klingon" in r.text


def test_aesthetic_nudge_moves_results_toward_the_score(client):
    base = caps(client.post("/knn", json={"text": "a red circle", "k": 20}))
    shares = []
    for w in (0.0, 0.5, 1.0, 2.0):
        c = caps(
            client.post(
                "/knn", json={"text": "a red circle", "k": 20, "aesthetic_score": 9, "aesthetic_weight": w}
            )
        )
        shares.append(sum("green" in x for x in c) / len(c))
        if w == 0.0:
            assert c == base
    assert shares == sorted(shares) and shares[-1] > shares[0] + 0.3, shares
    low = caps(
        client.post(
            "/knn", json={"text": "a red circle", "k": 20, "aesthetic_score": 0, "aesthetic_weight": 2.0}
        )
    )
    assert sum("black" in x for x in low) > sum("black" in x for x in base)


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"aesthetic_score": 10}, "aesthetic_score"),
        ({"aesthetic_score": -1}, "aesthetic_score"),
        ({"aesthetic_score": 3.5}, "aesthetic_score"),
        ({"aesthetic_score": 9, "aesthetic_weight": "Infinity"}, "aesthetic_weight"),
        ({"aesthetic_score": 9, "aesthetic_weight": "nan"}, "aesthetic_weight"),
        ({"violence": "maybe"}, "violence"),
    ],
)
def test_bad_fields_are_4xx_naming_them(client, extra, field):
    r = client.post("/knn", json={"text": "a red circle", **extra})
    assert r.status_code == 422 and field in r.text, r.text
    r = client.post("/knn", content=b'{"text": "x", "aesthetic_weight": NaN, "aesthetic_score": 1}',
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and "aesthetic_weight" in r.text


def test_no_table_no_model_is_400_naming_the_field(index_dir, encoder):
    with TestClient(create_app(ServeConfig(indices={"shapes": index_dir}), encoder=encoder)) as c:
        r = c.post("/knn", json={"text": "a red circle", "aesthetic_score": 9})
        assert r.status_code == 400 and "aesthetic_score" in r.json()["detail"]
        r = c.post("/knn", json={"text": "a red circle", "multilingual": True})
        assert r.status_code == 400 and "multilingual" in r.json()["detail"]
        # clip back's API ignores the score there, as clip back does for a model without embeddings
        r = c.post("/knn-service", json={"text": "a red circle", "num_images": 3, "aesthetic_score": 9})
        assert r.status_code == 200 and len(r.json()) == 3
        # existing clients: no new field in answers that did not ask for one
        r = c.post("/knn", json={"text": "a red circle", "k": 3}).json()
        assert set(r["removed"]) == {"duplicates", "unsafe"} and all("violent" not in h for h in r["results"])


def test_violence_removes_or_flags(client):
    base = caps(client.post("/knn", json={"text": "a red circle", "k": 30}))
    assert any("red" in c for c in base)
    r = client.post("/knn", json={"text": "a red circle", "k": 30, "violence": True})
    kept = caps(r)
    assert len(kept) == 30 and not any("red" in c for c in kept)
    assert r.json()["removed"]["violent"] > 0
    flagged = client.post("/knn", json={"text": "a red circle", "k": 30, "violence": "flag"}).json()[
        "results"
    ]
    assert [h["caption"] for h in flagged] == base
    assert all(h["violent"] == ("red" in h["caption"]) for h in flagged)
    form = client.post("/knn", data={"text": "a red circle", "k": "5", "violence": "flag"}).json()["results"]
    assert all("violent" in h for h in form)


def test_startup_checks(index_dir, encoder, tmp_path):
    with pytest.raises(ConfigError, match="multilingual model 'small'.*16-d"):
        create_app(
            ServeConfig(indices={"s": index_dir}), encoder=encoder, multilingual={"small": FakeEncoder(16)}
        )
    bad = tmp_path / "t.npy"
    save_table(bad, np.ones((10, 16), np.float32))
    with pytest.raises(ConfigError, match="16-d"):
        create_app(ServeConfig(indices={"s": index_dir}, aesthetic_embeddings=str(bad)), encoder=encoder)
    with pytest.raises(ConfigError, match="multilingual"):
        ServeConfig(indices={"s": index_dir}, multilingual_models=("a=x", "a=y"))
