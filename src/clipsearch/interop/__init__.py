"""Open the indices people already have: clip-retrieval index folders and autofaiss output (Fondant's
Datacomp-12M index on the Hub), converted into clipsearch index folders without re-embedding anything.

    from clipsearch.interop import ImportConfig, import_index
    info = import_index(ImportConfig(source="hf://datasets/fondant-ai/datacomp-small-clip",
                                     index_folder="datacomp-index",
                                     clip_model="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"))
"""

from __future__ import annotations

from clipsearch.interop.config import ImportConfig
from clipsearch.interop.importer import detect, import_index

__all__ = ["ImportConfig", "detect", "import_index"]
