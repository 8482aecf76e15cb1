"""The keyword query language, parsed leniently: every string is a valid query.

    red circle          either word; BM25 ranks captions with more (and rarer) matches first
    "red circle"        the phrase (required)
    +vellmora           required word        -blue, NOT blue     excluded word
    XK-4471             a compound: `XK-4471`, `XK 4471` and `XK4471` in a caption all match

What does not parse is searched as plain words and said in `notes` (never an error): an unbalanced quote
is dropped, a lone `+`, `-` or `NOT` is ignored, `AND` / `OR` are ignored (words are already OR-ed).
A query is cut to `MAX_UNITS` words and phrases (more add nothing to a ranking and cost a posting-list
scan each).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clipsearch.keywords import analyzer

MAX_UNITS = 32  # words and phrases in one keyword query; later ones are dropped (said in notes)
MAX_PHRASE_TERMS = 16


@dataclass(frozen=True)
class Unit:
    """One word, compound or phrase of a query: `terms` in order; `joined` = a compound's joined form."""

    terms: tuple[str, ...]
    joined: str | None = None
    phrase: bool = False  # typed in quotes

    def render(self) -> str:
        if self.phrase or (len(self.terms) > 1 and self.joined is None):
            return '"' + " ".join(self.terms) + '"'
        return self.joined or self.terms[0]


@dataclass
class KeywordQuery:
    should: list[Unit] = field(default_factory=list)
    must: list[Unit] = field(default_factory=list)
    must_not: list[Unit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def positive(self) -> list[Unit]:
        return self.must + self.should

    @property
    def empty(self) -> bool:
        return not self.positive

    def highlight_terms(self) -> set[str]:
        out: set[str] = set()
        for u in self.positive:
            out.update(u.terms)
            if u.joined:
                out.add(u.joined)
        return out

    def canonical(self) -> str:
        """The query as understood, e.g. `+"red circle" xk4471 -blue`."""
        return " ".join(
            [f"+{u.render()}" for u in self.must]
            + [u.render() for u in self.should]
            + [f"-{u.render()}" for u in self.must_not]
        )


_QUOTED = re.compile(r'([+-]?)"([^"]*)"')


def _units(text: str) -> list[Unit]:
    """The words of unquoted text: a plain word, a compound (joined by - . / _ '), or a run of a script
    without spaces (its bigrams, as a phrase)."""
    out = []
    for m in analyzer._TOKEN.finditer(text):
        run, word = m.group(1), m.group(2)
        if run:
            grams = tuple(analyzer.normalize(b) for b in analyzer._bigrams(run))
            out.append(Unit(grams[:MAX_PHRASE_TERMS]))
            continue
        pieces = [analyzer.fold(analyzer.normalize(p)) for p in analyzer._JOINERS.split(word)]
        pieces = [p for p in pieces if p and len(p) <= analyzer.MAX_TOKEN_CHARS]
        if not pieces:
            continue
        if len(pieces) == 1:
            out.append(Unit((pieces[0],)))
        else:
            joined = "".join(pieces)
            out.append(Unit(tuple(pieces[:MAX_PHRASE_TERMS]), joined if len(joined) <= 40 else None))
    return out


def parse(text: str) -> KeywordQuery:
    q = KeywordQuery()
    text = text or ""
    if text.count('"') % 2:
        # an unbalanced quote: the last one is dropped, the rest reads as usual
        i = text.rfind('"')
        text = text[:i] + " " + text[i + 1 :]
        q.notes.append("an unbalanced quote was ignored")
    pieces: list[tuple[str, str, bool]] = []  # (operator, text, quoted)
    pos = 0
    for m in _QUOTED.finditer(text):
        pieces.append(("", text[pos : m.start()], False))
        pieces.append((m.group(1), m.group(2), True))
        pos = m.end()
    pieces.append(("", text[pos:], False))
    pending_not = False
    for op, chunk, quoted in pieces:
        if quoted:  # a phrase in quotes is required, unless excluded
            op = "-" if pending_not or op == "-" else "+"
            pending_not = False
            terms = tuple(analyzer.terms_in_order(chunk))[:MAX_PHRASE_TERMS]
            if terms:
                _add(q, op, Unit(terms, None, phrase=len(terms) > 1))
            continue
        for raw in chunk.split():
            op, word = (raw[0], raw[1:]) if raw[0] in "+-" else ("", raw)
            if word in ("AND", "OR", "&&", "||"):
                q.notes.append(f"'{word}' was ignored: words are matched with OR and ranked by BM25")
                continue
            if word in ("NOT", "!"):
                pending_not = True
                continue
            units = _units(word)
            if not units:
                if op or raw in "+-":
                    q.notes.append(f"a lone '{raw}' was ignored")
                continue
            if pending_not:
                op, pending_not = "-", False
            for u in units:
                _add(q, op, u)
    if pending_not:
        q.notes.append("a lone 'NOT' was ignored")
    n = len(q.must) + len(q.should) + len(q.must_not)
    if n > MAX_UNITS:
        keep = MAX_UNITS
        q.must = q.must[:keep]
        keep -= len(q.must)
        q.should = q.should[:keep]
        keep -= len(q.should)
        q.must_not = q.must_not[: max(0, keep)]
        q.notes.append(f"the query was cut to its first {MAX_UNITS} words and phrases")
    return q


def _add(q: KeywordQuery, op: str, unit: Unit) -> None:
    target = q.must if op == "+" else q.must_not if op == "-" else q.should
    if unit not in target:
        target.append(unit)
