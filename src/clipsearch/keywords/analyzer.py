"""The keyword analyzer: captions and queries become the same terms, in any language.

- Text is NFKC-normalised and case-folded (`Straße` -> `strasse`, full-width `ＸＫ` -> `xk`).
- Scripts written with spaces (Latin, Greek, Cyrillic, Arabic, Hebrew, Devanagari, Hangul, ...) are cut into
  words of letters, marks and digits (marks matter: Devanagari vowel signs are marks). Latin and Greek
  words also lose their accents (`café` -> `cafe`), as Lucene's ASCII folding does.
- Scripts written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) become overlapping
  character bigrams (`東京タワー` -> `東京 京タ タワ ワー`), as Lucene's CJK analyzer does: no dictionary
  needed, and a query's bigrams match wherever the same characters appear.
- A compound joined by `-`, `.`, `/`, `_` or `'` (`XK-4471`, `v2.1`, `AB/12`) gives its parts and also the
  joined form (`xk4471`) at the position of its first part, so `XK-4471`, `XK 4471` and `XK4471` all find it.
- No stemming and no stop words: the language of a caption is unknown, and BM25's IDF already gives common
  words little weight.

Tokens carry character offsets into the *original* text, so matched words can be highlighted.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import regex

VERSION = "clipsearch-multilingual-1"  # recorded in index.json: a reader refuses an analyzer it lacks
MAX_TOKEN_CHARS = 40  # longer runs (base64, hashes glued together) are not words anyone types

# Explicit ranges and the stdlib `re` (C speed, ~3x faster than `regex` classes on 1M captions):
# scripts without spaces (Han, kana with the prolonged sound mark, Thai, Lao, Myanmar, Khmer) ...
_NOSPACE = (
    "\u3005\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0003134f\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
)
# ... and the combining marks `\w` leaves out (Latin, Cyrillic, Hebrew, Arabic, the Indic blocks, Tibetan)
_MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed"
    "\u0900-\u0dff\u0f00-\u0fff\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_W = f"(?:[^\\W_{_NOSPACE}]|[{_MARKS}])"
_TOKEN = re.compile(f"([{_NOSPACE}]+)|({_W}+(?:[-./_'\u2019]{_W}+)*)")
_JOINERS = re.compile("[-./_'\u2019]")
_ASCII_WORD = re.compile("()([a-z0-9]+(?:[-./_'][a-z0-9]+)*)")  # the same rule on ASCII text, 4x faster
_FOLDABLE = regex.compile(r"^[\p{Latin}\p{Greek}\p{N}\p{M}]+$")
_MARKS_MN = regex.compile(r"\p{Mn}+")


@dataclass(frozen=True)
class Token:
    text: str  # the term
    position: int
    start: int  # character offsets into the original text
    end: int


def fold(word: str) -> str:
    """Accents off Latin and Greek words (others keep their marks: Devanagari vowel signs are marks)."""
    if word.isascii():
        return word
    d = unicodedata.normalize("NFKD", word)
    return unicodedata.normalize("NFC", _MARKS_MN.sub("", d)) if _FOLDABLE.match(d) else word


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _bigrams(run: str) -> list[str]:
    return [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]


def index_text(text: str | None) -> str:
    """A caption as the whitespace-separated terms the keyword index stores (the fast path of the build).

    The joined forms of compounds go last, so that phrases over the other terms keep their positions."""
    if not text:
        return ""
    out: list[str] = []
    joined: list[str] = []
    norm = text.lower() if text.isascii() else normalize(text)
    for run, word in (_ASCII_WORD if norm.isascii() else _TOKEN).findall(norm):
        if run:
            out.extend(_bigrams(run))
            continue
        parts = _JOINERS.split(word)
        if len(parts) > 1:
            out.extend(fold(p) for p in parts if len(p) <= MAX_TOKEN_CHARS)
            j = fold("".join(parts))
            if len(j) <= MAX_TOKEN_CHARS:
                joined.append(j)
        elif len(word) <= MAX_TOKEN_CHARS:
            out.append(fold(word))
    if joined:
        out.extend(joined)
    return " ".join(out)


def tokenize(text: str | None) -> list[Token]:
    """Terms of `text` with character offsets into `text` as given (for highlighting). The same terms as
    `index_text` (a compound's joined form is placed at its first part)."""
    out: list[Token] = []
    if not text:
        return out
    pos = 0
    for m in _TOKEN.finditer(text):
        run, word = m.group(1), m.group(2)
        start = m.start()
        if run:
            for i, bg in enumerate(_bigrams(run)):
                out.append(Token(normalize(bg), pos, start + i, start + i + len(bg)))
                pos += 1
            continue
        first = pos
        s = start
        pieces = _JOINERS.split(word)
        for piece in pieces:
            term = fold(normalize(piece))
            if len(term) <= MAX_TOKEN_CHARS:
                out.append(Token(term, pos, s, s + len(piece)))
                pos += 1
            s += len(piece) + 1
        if len(pieces) > 1:
            joined = fold(normalize("".join(pieces)))
            if len(joined) <= MAX_TOKEN_CHARS:
                out.append(Token(joined, first, start, start + len(word)))
    return out


def terms(text: str | None) -> list[str]:
    return index_text(text).split()


def terms_in_order(text: str | None) -> list[str]:
    """The terms of a phrase, in order, without compounds' joined forms (they share a position)."""
    seen: set[int] = set()
    out = []
    for t in tokenize(text):
        if t.position not in seen:
            seen.add(t.position)
            out.append(t.text)
    return out
