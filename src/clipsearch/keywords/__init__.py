"""Keyword search over captions: a tantivy (BM25) index beside the faiss indices, one per index folder or
segment, with ids equal to the faiss ids (docs/formats.md section 3, `keywords/`).

- `analyzer.py`: captions and queries become the same terms, in any language.
- `query.py`: the lenient keyword query language.
- `writer.py`: `build_keyword_index(folder)` from the folder's `metadata.arrow`.
- `reader.py`: `KeywordIndex`, the memory-mapped index a searcher opens.
The fusion with CLIP lives with the searchers (`clipsearch.search.hybrid`).
"""
