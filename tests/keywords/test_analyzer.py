"""The keyword analyzer and the lenient query language."""

from __future__ import annotations

import pytest

from clipsearch.keywords import analyzer
from clipsearch.keywords.highlight import highlight_spans
from clipsearch.keywords.query import MAX_UNITS, parse


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("A red circle with code XK-4471", "a red circle with code xk 4471 xk4471"),
        (
            "Straße café ＸＫ-４４７１ naïve",
            "strasse cafe xk 4471 naive xk4471",
        ),  # NFKC, case folding, accents
        ("東京タワーの夜景", "東京 京タ タワ ワー ーの の夜 夜景"),  # bigrams, the prolonged sound mark kept
        ("हिन्दी भाषा", "हिन्दी भाषा"),  # Devanagari marks stay inside the word
        ("Москва й", "москва й"),  # Cyrillic keeps its letters (no folding of й)
        ("ภาษาไทย", "ภา าษ ษา าไ ไท ทย"),  # Thai has no spaces: bigrams
        ("한국어 텍스트", "한국어 텍스트"),
        ("مرحبا بالعالم", "مرحبا بالعالم"),
        ("v2.1 AB/12 snake_case", "v2 1 ab 12 snake case v21 ab12 snakecase"),
        ("", ""),
        ("!!! ...", ""),
    ],
)
def test_index_terms_in_many_scripts(text, want):
    assert analyzer.index_text(text) == want
    # the highlighting path (offsets into the original) finds the same terms
    assert sorted(t.text for t in analyzer.tokenize(text)) == sorted(want.split())


def test_very_long_runs_are_not_terms():
    assert analyzer.index_text("a" * 41 + " ok") == "ok"


def test_highlight_spans_count_code_points():
    cap = "🙂 Red circle, code XK-4471 東京タワー"
    spans = highlight_spans(cap, parse("red xk4471 タワー").highlight_terms())
    got = ["".join(list(cap)[s:e]) for s, e in spans]
    assert got == ["Red", "XK-4471", "タワー"]


def test_query_syntax():
    q = parse('"red circle" +vellmora -blue NOT green XK-4471 東京')
    assert q.canonical() == '+"red circle" +vellmora xk4471 東京 -blue -green'
    assert [u.terms for u in q.must] == [("red", "circle"), ("vellmora",)]
    assert [u.terms for u in q.must_not] == [("blue",), ("green",)]
    assert q.should[0].joined == "xk4471" and q.should[0].terms == ("xk", "4471")
    assert q.notes == []


@pytest.mark.parametrize(
    ("text", "note", "canonical"),
    [
        ('red "circle', "unbalanced quote", "red circle"),
        ('"red circle" "blue', "unbalanced quote", '+"red circle" blue'),
        ("red -", "lone '-'", "red"),
        ("+ red", "lone '+'", "red"),
        ("red NOT", "lone 'NOT'", "red"),
        ("red AND circle OR", "'AND' was ignored", "red circle"),
        ('""', None, ""),
        ("-", "lone '-'", ""),
    ],
)
def test_query_errors_become_plain_words(text, note, canonical):
    q = parse(text)
    assert q.canonical() == canonical
    if note:
        assert any(note in n for n in q.notes), q.notes


def test_long_query_is_cut():
    q = parse(" ".join(f"w{i}" for i in range(500)))
    assert len(q.should) == MAX_UNITS and any("cut" in n for n in q.notes)
