"""Aesthetic nudging, as clip back does it: a query vector moves toward the images rated at a score.

    table = load_table("index/aesthetic_embeddings.npy")      # float32 [10, dim]: row s = images rated s
    q = nudge(q, table, score=9, weight=0.5)                   # normalize(q + 0.5 * table[9])

The table is made from a linear aesthetic predictor over an index's own image embeddings
(`clipsearch aesthetic --index DIR --predictor FILE`, `build.build_table`), or read from LAION's
per-model files (`rating0.npy` ... `rating9.npy`). docs/serve.md, "Aesthetic nudging", gives the format.
"""

from clipsearch.aesthetic.table import (
    NUM_SCORES,
    TABLE_FILE,
    find_table,
    load_table,
    nudge,
    save_table,
)

__all__ = ["NUM_SCORES", "TABLE_FILE", "find_table", "load_table", "nudge", "save_table"]
