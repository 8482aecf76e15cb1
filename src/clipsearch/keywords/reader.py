"""`KeywordIndex`: the memory-mapped tantivy index of one index folder (or segment), searched with BM25.

tantivy opens a folder through its memory-mapped directory: only the posting lists and fast-field pages a
query touches come into memory. Ids come from the `id` fast field (never from stored documents), so a hit
costs no decompression. Filters and tombstones are id bitmaps: the top hits are fetched deeper (doubling)
until enough of them are allowed or every match has been seen, so the ranking over the allowed rows is the
same as if only they had been indexed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any

import numpy as np

from clipsearch.errors import InputError
from clipsearch.keywords import analyzer, writer
from clipsearch.keywords.query import KeywordQuery, Unit

logger = logging.getLogger(__name__)


class KeywordIndex:
    def __init__(self, folder: str, entry: dict[str, Any], count: int):
        import tantivy

        self._t = tantivy
        self.path = os.path.join(folder, str(entry.get("dir") or writer.DIR))
        self.column = str(entry.get("column") or writer.COLUMN)
        if entry.get("analyzer") != analyzer.VERSION:
            raise InputError(
                f"{self.path} was built with the keyword analyzer {entry.get('analyzer')!r}, this clipsearch "
                f"has {analyzer.VERSION!r}",
                hint="rebuild the index with this version of `clipsearch index`",
            )
        if not os.path.isdir(self.path):
            raise InputError(f"index.json names the keyword index {self.path} but it is missing")
        try:
            self.index = tantivy.Index.open(self.path)
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path} is not a readable keyword index: {e}") from e
        self.schema = self.index.schema
        self.searcher = self.index.searcher()
        self.num_docs = int(self.searcher.num_docs)
        self.count = count  # rows of the folder (rows without a caption have no document)
        if self.num_docs > count:
            raise InputError(f"{self.path} holds {self.num_docs} captions but the folder has {count} rows")
        self._df_lock = threading.Lock()
        self._df: dict[Unit, int] = {}

    # ------------------------------------------------------------------ queries
    def _unit_query(self, u: Unit) -> Any:
        t = self._t
        if len(u.terms) == 1:
            return t.Query.term_query(self.schema, self.column, u.terms[0])
        phrase = t.Query.phrase_query(self.schema, self.column, list(u.terms))
        if u.joined is None:
            return phrase
        joined = t.Query.term_query(self.schema, self.column, u.joined)
        return t.Query.boolean_query([(t.Occur.Should, joined), (t.Occur.Should, phrase)])

    def query(self, q: KeywordQuery) -> Any:
        t = self._t
        clauses = [(t.Occur.Must, self._unit_query(u)) for u in q.must]
        clauses += [(t.Occur.Should, self._unit_query(u)) for u in q.should]
        clauses += [(t.Occur.MustNot, self._unit_query(u)) for u in q.must_not]
        return t.Query.boolean_query(clauses)

    def doc_freq(self, u: Unit) -> int:
        """Captions that match the word or phrase (cached: the index never changes)."""
        df = self._df.get(u)
        if df is not None:
            return df
        if len(u.terms) == 1:
            df = int(self.searcher.doc_freq(self.column, u.terms[0]))
        else:
            df = int(self.searcher.search(self._unit_query(u), 1, count=True).count)
        with self._df_lock:
            if len(self._df) > 65536:
                self._df.clear()
            self._df[u] = df
        return df

    def search(
        self, q: KeywordQuery, k: int, allowed: Any = None, tq: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, BM25 scores) of the best k matching rows, best first; `allowed`: a bitmap with
        `contains(ids)` (filter AND live rows), None = every row."""
        if q.empty or k <= 0 or self.num_docs == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        tq = tq if tq is not None else self.query(q)
        fetch = k if allowed is None else int(min(self.num_docs, max(2 * k, 64)))
        while True:
            res = self.searcher.search(tq, fetch, count=allowed is not None)
            hits = res.hits
            scores = np.fromiter((h[0] for h in hits), np.float32, len(hits))
            ids = np.asarray(self.searcher.fast_field_values("id", [h[1] for h in hits]), dtype=np.int64)
            if allowed is None:
                return ids, scores
            ok = allowed.contains(ids)
            if ok.sum() >= k or len(hits) < fetch or fetch >= res.count:
                ids, scores = ids[ok][:k], scores[ok][:k]
                return ids, scores
            # the filter refused too many of the best hits: look deeper (at most every match)
            want = math.ceil(fetch * 4 if ok.sum() == 0 else fetch * min(16.0, 1.5 * k / max(1, ok.sum())))
            fetch = int(min(res.count, max(want, fetch * 2)))
