"""Where a caption matches a keyword query: spans to highlight, in Unicode code points."""

from __future__ import annotations

from clipsearch.keywords.analyzer import tokenize


def highlight_spans(caption: str | None, terms: set[str]) -> list[list[int]]:
    """Sorted, merged [start, end) code-point offsets of the caption's words whose term is in `terms`
    (a script without spaces matches by bigrams, so overlapping bigrams merge into one span)."""
    if not caption or not terms:
        return []
    spans = sorted((t.start, t.end) for t in tokenize(caption) if t.text in terms)
    out: list[list[int]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out
