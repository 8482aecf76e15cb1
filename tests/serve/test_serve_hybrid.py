"""mode=keyword and mode=hybrid over /knn: exact caption matches, fusion, filters, dedup, pages, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder, build_index, captions

N = 3000
RARE = {11: "XK-4471", 222: "QZ-9013", 1500: "Vellmora"}  # rows whose caption carries a made-up token
BRAND_ROWS = list(range(40, 3000, 150))  # 20 rows by the brand "Zorblat", of every colour and shape


@pytest.fixture(scope="module")
def hybrid_index(tmp_path_factory):
    enc = FakeEncoder(32)
    base = captions(N, 3)
    caps = list(base)
    for i, tok in RARE.items():
        caps[i] = f"{base[i]}, code {tok}"
    for i in BRAND_ROWS:
        caps[i] = f"Zorblat product photo {i}"  # the caption says the brand, not what the picture shows
    folder = str(tmp_path_factory.mktemp("hybrid") / "index")
    # the "CLIP" vectors know the pictures (base captions), never the made-up tokens
    build_index(
        folder, n=N, encoder=enc, caption_list=caps, vector_captions=base, keywords=True, vectors_file=True
    )
    plain = str(tmp_path_factory.mktemp("hybrid") / "plain")
    build_index(plain, n=200, encoder=enc)
    app = create_app(ServeConfig(indices={"kw": folder, "plain": plain}), encoder=enc)
    with TestClient(app) as c:
        yield c, base, caps


def knn(c, **body):
    body.setdefault("index", "kw")
    r = c.post("/knn", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_rare_token_found_by_keyword_and_hybrid_not_by_clip(hybrid_index):
    c, _, _ = hybrid_index
    for row, tok in RARE.items():
        sem = [h["id"] for h in knn(c, text=tok, k=10)["results"]]
        assert row not in sem
        for mode in ("keyword", "hybrid"):
            out = knn(c, text=tok, k=10, mode=mode)
            assert out["results"][0]["id"] == row, (mode, tok)
    # the compound matches however it is typed
    for typed in ("xk4471", "XK 4471", "xk-4471"):
        assert knn(c, text=typed, mode="keyword")["results"][0]["id"] == 11


def test_hybrid_reports_both_scores_and_highlights(hybrid_index):
    c, _, caps = hybrid_index
    out = knn(c, text="circle with code XK-4471", k=5, mode="hybrid")
    assert out["mode"] == "hybrid" and out["fusion"] == "weighted" and out["keyword_weight"] > 1.5
    top = out["results"][0]
    assert top["id"] == 11
    assert (
        isinstance(top["similarity"], float)
        and top["keyword_score"] > 0
        and top["score"] >= top["similarity"]
    )
    spans = ["".join(list(caps[11])[s:e]) for s, e in top["highlights"]]
    assert "XK-4471" in spans
    scores = [h["score"] for h in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_descriptive_hybrid_keeps_clip_order_mostly(hybrid_index):
    c, base, _ = hybrid_index
    out_s = knn(c, text="a red circle", k=10, deduplicate=False)
    out_h = knn(c, text="a red circle", k=10, deduplicate=False, mode="hybrid")
    assert out_h["keyword_weight"] < 0.5  # common words: CLIP decides
    good = lambda ids: sum(base[i] == "a red circle" for i in ids)  # noqa: E731
    assert good([h["id"] for h in out_h["results"]]) >= good([h["id"] for h in out_s["results"]]) - 1


def test_brand_query_puts_its_captions_first_and_clip_orders_them(hybrid_index):
    c, base, _ = hybrid_index
    out = knn(c, text="Zorblat", k=10, mode="hybrid", deduplicate=False)
    assert all(h["id"] in BRAND_ROWS for h in out["results"])
    rrf = knn(c, text="Zorblat", k=10, mode="hybrid", fusion="rrf", deduplicate=False)
    assert sum(h["id"] in BRAND_ROWS for h in rrf["results"]) < 10  # what the weighted fusion fixes
    mixed = knn(c, text=f"{base[BRAND_ROWS[3]]} Zorblat", k=3, mode="hybrid", deduplicate=False)
    assert (
        mixed["results"][0]["id"] == BRAND_ROWS[3] or base[mixed["results"][0]["id"]] == base[BRAND_ROWS[3]]
    )


def test_keyword_mode_applies_filters_inside_and_pages(hybrid_index):
    c, _, caps = hybrid_index
    out = knn(
        c, text="red", mode="keyword", k=20, filter="width >= 900", columns=["width"], deduplicate=False
    )
    assert out["results"] and all(h["width"] >= 900 and "red" in caps[h["id"]] for h in out["results"])
    assert out["filter_matches"] is not None
    # a filter that leaves few rows: the keyword side looks deeper until it has them all
    few = knn(c, text="red", mode="keyword", k=50, filter="bucket == 7", deduplicate=False)
    assert {h["id"] for h in few["results"]} == {
        i for i in range(N) if i % 1000 == 7 and "red" in caps[i].split()
    }
    p1 = knn(c, text="red", mode="hybrid", k=5, deduplicate=False)
    p2 = knn(c, text="red", mode="hybrid", k=5, offset=5, deduplicate=False)
    both = knn(c, text="red", mode="hybrid", k=10, deduplicate=False)
    assert [h["id"] for h in p1["results"] + p2["results"]] == [h["id"] for h in both["results"]]
    assert p1["next_offset"] == 5


def test_hybrid_deduplicates(hybrid_index):
    c, _, _ = hybrid_index
    on = knn(c, text="a blue star", mode="hybrid", k=10)
    off = knn(c, text="a blue star", mode="hybrid", k=10, deduplicate=False)
    assert len(on["results"]) == len(off["results"]) == 10
    assert on["removed"]["duplicates"] >= 0


@pytest.mark.parametrize(
    "text",
    [
        '"unbalanced',
        "-",
        "+",
        "NOT",
        "AND OR",
        '""',
        "- + NOT AND",
        '"' * 7,
        "xk-" * 600,
        " ".join(["w"] * 999),
    ],
)
def test_hostile_keyword_queries_are_never_5xx(hybrid_index, text):
    c, _, _ = hybrid_index
    for mode in ("keyword", "hybrid"):
        r = c.post("/knn", json={"index": "kw", "text": text[:2000], "mode": mode})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["notes"], list) and isinstance(body["keyword_query"], str)


def test_long_query_is_cut_and_said(hybrid_index):
    c, _, _ = hybrid_index
    out = knn(c, text=" ".join(f"w{i}" for i in range(300)), mode="keyword")  # < 2,000 characters
    assert any("cut" in n for n in out["notes"])


def test_text_over_the_limit_is_cut_in_keyword_and_hybrid_refused_in_semantic(hybrid_index):
    c, _, _ = hybrid_index
    text = "QZ-9013 " + " ".join(["wordy"] * 600)  # 3,607 characters
    for mode in ("keyword", "hybrid"):
        out = knn(c, text=text, mode=mode)
        assert out["notes"][0] == "the text was cut to its first 1999 characters (max_text_chars)"
        assert out["results"][0]["id"] == 222  # the code at its start is still searched
    r = c.post("/knn", json={"index": "kw", "text": text, "mode": "semantic"})
    assert r.status_code == 400 and "longer than 2000 characters" in r.json()["detail"]
    assert c.post("/knn", json={"index": "kw", "text": "x" * 100_001, "mode": "keyword"}).status_code == 422


def test_cut_text_keeps_whole_words():
    from clipsearch.serve.service import cut_text

    assert cut_text("abc def", 10) == ("abc def", False)
    assert cut_text("abcd efgh", 7) == ("abcd", True)  # not "abcd ef"
    assert cut_text("abc def", 4) == ("abc", True)
    assert cut_text("abcdefgh", 5) == ("abcde", True)  # one long word: cut inside it


def test_bad_mode_input_is_4xx(hybrid_index):
    c, _, _ = hybrid_index
    r = c.post("/knn", json={"index": "plain", "text": "red", "mode": "hybrid"})
    assert (
        r.status_code == 400
        and "no keyword index" in r.json()["detail"]
        and "clipsearch index" in r.json()["detail"]
    )
    r = c.post("/knn", json={"index": "kw", "id": 3, "mode": "keyword"})
    assert r.status_code == 400 and "needs a text query" in r.json()["detail"]
    assert c.post("/knn", json={"index": "kw", "text": "x", "mode": "fuzzy"}).status_code == 422
    assert (
        c.post("/knn", json={"index": "kw", "text": "x", "mode": "hybrid", "fusion": "max"}).status_code
        == 422
    )
    r = c.post("/knn", data={"index": "kw", "text": "XK-4471", "mode": "keyword"})  # form bodies too
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 11


def test_semantic_answers_are_unchanged(hybrid_index):
    c, _, _ = hybrid_index
    out = knn(c, text="a red circle", k=3)
    assert set(out["results"][0]) == {"id", "similarity", "url", "caption"}
    assert "keyword_query" not in out
    info = {i["name"]: i for i in c.get("/indices").json()["indices"]}
    assert info["kw"]["keywords"] is True and info["plain"]["keywords"] is False


def test_keyword_mode_skips_the_text_encoder(hybrid_index):
    c, _, _ = hybrid_index
    out = knn(c, text="QZ-9013 never encoded", mode="keyword")
    assert "encode" not in out["timings_ms"] and out["results"][0]["similarity"] is None
    assert np.isfinite(out["results"][0]["keyword_score"])


def test_names_are_told_from_words_by_the_model_tokenizer():
    from clipsearch.embed.models import load_clip
    from clipsearch.keywords.query import parse
    from clipsearch.search.hybrid import WordPieces, is_name

    pieces = WordPieces(load_clip("clipsearch-tiny", backend="torch").tokenize)
    unit = {u.render(): u for u in parse("wood red Vellmora XK-4471 sn48291").should}
    # words the model knows
    assert not is_name(unit["wood"], 0.02, pieces) and not is_name(unit["red"], 0.02, pieces)
    assert is_name(unit["vellmora"], 0.004, pieces)  # cut into pieces: a name
    assert is_name(unit["xk4471"], 0.0001, pieces) and is_name(unit["sn48291"], 0.0001, pieces)  # codes
    assert not is_name(unit["vellmora"], 0.06, pieces)  # in 6 % of the captions: a word of this corpus
    # without a tokenizer: a word in at most 1 % of the captions
    assert is_name(unit["wood"], 0.005, None) and not is_name(unit["wood"], 0.02, None)


def test_exclusion_and_required_words_in_hybrid(hybrid_index):
    c, _, caps = hybrid_index
    out = knn(c, text="a red circle -circle", mode="hybrid", k=20, deduplicate=False)
    assert out["results"] and all("circle" not in caps[h["id"]] for h in out["results"])
    out = knn(c, text="+Zorblat red", mode="hybrid", k=30, deduplicate=False)
    assert {h["id"] for h in out["results"]} == set(BRAND_ROWS)
