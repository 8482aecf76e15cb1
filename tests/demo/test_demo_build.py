"""`clipsearch demo --no-serve` end to end on a small sample, then the app the demo serves: the sample's
quality labels reach the index, the shipped quality predictor rates it, and aesthetic nudging favours the
sharp images (issue 17's goal, on the sample's known labels) while colour+shape precision holds; queries in
French, German, Spanish and Chinese find the same pairs as English."""

from __future__ import annotations

import json
import socket
from collections import Counter

import pyarrow.feather as feather
import pytest
from fastapi.testclient import TestClient

from clipsearch.cli import main
from clipsearch.demo.cli import _sample, demo_app
from clipsearch.demo.languages import LANGUAGES, canonical
from clipsearch.demo.sample import COLORS, SHAPES, sample_attributes

PAIRS = [(c, s) for c in COLORS for s in SHAPES]
N, DEGRADED, K = 1200, 0.4, 10


ARGV = ["-q", "demo", "--no-serve", "--num-images", str(N), "--degraded", str(DEGRADED), "--seed", "5"]


def _free_port() -> int:
    # the demo's URLs name the port its image server listens on, so it needs a number before it starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo")
    assert main([*ARGV, "--data-dir", str(data), "--port", str(PORT)]) == 0
    index = data / "build" / "index"
    with TestClient(demo_app(index, data)) as client:
        yield data, index, client


def _top(client, text: str, k: int = K, **extra) -> list[dict]:
    r = client.post("/knn", json={"text": text, "k": k, "columns": ["color", "shape", "quality"], **extra})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == k
    return hits


def _scores(client, texts, k: int = K, **extra) -> tuple[float, float]:
    """(colour+shape precision@k, share of sharp images in the top k), means over the 48 pairs."""
    prec = qual = 0.0
    for text, (c, s) in zip(texts, PAIRS, strict=True):
        hits = _top(client, text, k, **extra)
        prec += sum(h["color"] == c and h["shape"] == s for h in hits) / k / len(PAIRS)
        qual += sum(h["quality"] == "sharp" for h in hits) / k / len(PAIRS)
    return prec, qual


def test_degraded_share_reaches_the_index_and_is_rated(built):
    data, index, client = built
    rows = [json.loads(x) for x in (data / "sample" / "sample.jsonl").read_text().splitlines()]
    quality = feather.read_table(index / "metadata.arrow", columns=["quality"]).column(0).to_pylist()
    # a starved machine can time a few local downloads out: nearly all arrive, with their labels
    assert len(rows) == N and len(quality) >= 0.97 * N
    assert not Counter(quality) - Counter(r["quality"] for r in rows)
    assert [(r["color"], r["shape"]) for r in rows[:50]] == [sample_attributes(i, 5)[:2] for i in range(50)]
    for q, share in (("sharp", 1 - DEGRADED), ("blurred", DEGRADED / 2), ("noisy", DEGRADED / 2)):
        assert abs(quality.count(q) / len(quality) - share) < 0.05, (q, quality.count(q))
    summary = json.loads((index / "aesthetic_embeddings.json").read_text())
    assert summary["method"] == "direction" and sum(summary["counts"]) == len(quality)
    info = client.get("/indices").json()
    assert info["multilingual"] == ["clipsearch-tiny-multilingual"]
    assert [i["aesthetic"] for i in info["indices"]] == [True]


def test_nudging_raises_quality_and_keeps_precision(built):
    _, _, client = built
    english = [canonical("en", c, s) for c, s in PAIRS]
    plain = _scores(client, english)
    figures = {w: _scores(client, english, aesthetic_score=9, aesthetic_weight=w) for w in (0.0, 0.5, 1.0)}
    assert figures[0.0] == plain  # weight 0 changes nothing
    quality = [figures[w][1] for w in (0.0, 0.5, 1.0)]
    print("precision@10, quality@10 by weight:", figures)
    assert quality[0] < quality[1] < quality[2] and quality[2] > quality[0] + 0.05, figures
    assert all(figures[w][0] >= plain[0] - 0.1 for w in figures), figures
    # toward score 0 the degraded images come first
    assert _scores(client, english, aesthetic_score=0, aesthetic_weight=1.0)[1] < quality[0] - 0.05


def test_languages_find_what_english_finds(built):
    _, _, client = built
    english = _scores(client, [canonical("en", c, s) for c, s in PAIRS], 5)[0]
    assert english > 0.6
    for lang in LANGUAGES:
        p = _scores(client, [canonical(lang, c, s) for c, s in PAIRS], 5, multilingual=True)[0]
        assert p >= 0.9 * english, (lang, p, english)


def test_degraded_out_of_range_is_one_line(tmp_path, capsys):
    assert main(["demo", "--no-serve", "--data-dir", str(tmp_path / "d"), "--degraded", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--degraded" in err
    assert not (tmp_path / "d").exists()


def test_serve_with_an_unknown_multilingual_model_is_one_line(built, capsys):
    _, index, _ = built
    code = main(
        ["serve", "--index", f"demo={index}", "--multilingual-model", "/nonexistent/model", "--port", "1"]
    )
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert code == 2 and len(errors) == 1
    assert "--multilingual-model" in errors[0] and "/nonexistent/model" in errors[0]


def test_a_second_run_reuses_only_a_sample_of_the_same_settings(built):
    data, index, _ = built
    stamp = (index / "index.json").stat().st_mtime_ns
    assert main([*ARGV, "--data-dir", str(data), "--port", str(PORT)]) == 0
    assert (index / "index.json").stat().st_mtime_ns == stamp  # same settings: nothing rebuilt
    assert len(_sample(data / "sample", N, 5, DEGRADED)) == N
    # other settings make the sample (and so the index) again
    for other in ((N + 1, 5, DEGRADED), (N, 6, DEGRADED), (N, 5, 0.2)):
        assert _sample(data / "sample", *other) is None, other


def test_another_port_builds_the_index_again_with_its_urls(tmp_path):
    """The image URLs name the port the page is served on: an index built for another port is built again
    (the sample is reused), so the result grid's images load from the new address."""
    argv = ["-q", "demo", "--no-serve", "--num-images", "48", "--seed", "3", "--data-dir", str(tmp_path)]
    first, second = _free_port(), _free_port()
    assert main([*argv, "--port", str(first)]) == 0
    sample_stamp = (tmp_path / "sample" / "sample.jsonl").stat().st_mtime_ns
    assert main([*argv, "--port", str(second)]) == 0
    urls = feather.read_table(tmp_path / "build" / "index" / "metadata.arrow").column("url").to_pylist()
    assert len(urls) == 48 and all(u.startswith(f"http://127.0.0.1:{second}/") for u in urls)
    assert (tmp_path / "sample" / "sample.jsonl").stat().st_mtime_ns == sample_stamp
