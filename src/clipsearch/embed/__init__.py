"""The embed stage: image shards -> CLIP image and caption embeddings (docs/embed.md).

    from clipsearch.embed import EmbedConfig, embed
    embed(EmbedConfig(input_dataset="images/", output_folder="embeddings/"))

Exports are lazy so that decode workers, which import `clipsearch.embed.preprocess`, never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from clipsearch.embed.config import EmbedConfig
    from clipsearch.embed.runner import embed

__all__ = ["EmbedConfig", "embed"]


def __getattr__(name: str) -> Any:
    if name == "EmbedConfig":
        from clipsearch.embed.config import EmbedConfig

        return EmbedConfig
    if name == "embed":
        from clipsearch.embed.runner import embed

        return embed
    raise AttributeError(name)
