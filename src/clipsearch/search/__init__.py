"""The reading side of an index folder, shared by `serve` (HTTP), `query` (batch) and `segments`.

- `searcher.py`: `IndexSearcher`, one index folder (faiss indices per modality, metadata, filter planner).
- `live.py`: `SegmentedSearcher` (one generation of a segmented folder: segments + tombstones),
  `LiveIndex` (the served handle, hot-reloaded on manifest changes) and `open_index` (one-off use).
- `fanout.py`: one coarse pass and one re-rank over segments that share the base's IVF quantizer.
- `filters.py`: the metadata filter language, compiled to id bitmaps.
- `metadata.py`: memory-mapped `metadata.arrow` row lookups.

Nothing here knows HTTP; `serve/` is the web layer on top of it.
"""
