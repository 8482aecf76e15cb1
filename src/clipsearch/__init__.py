"""clipsearch: URL lists -> image shards -> CLIP embeddings -> faiss indices -> search API."""

__version__ = "0.1.0"
