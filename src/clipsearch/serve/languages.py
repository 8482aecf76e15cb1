"""Multilingual text encoders served beside the index's own model (`--multilingual-model`).

Each is loaded at start-up (a bad name or a dimension that differs from the indices' fails at once, exit 2)
and gets its own text batcher; a request picks one with `multilingual` (/knn) or `use_mclip` (/knn-service).
"""

from __future__ import annotations

import logging
from typing import Any

from clipsearch.errors import ConfigError, InputError
from clipsearch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def load_multilingual(
    settings: ServeSettings, dim: int, injected: dict[str, Any] | None = None
) -> dict[str, Any]:
    """{alias: encoder}, in the settings' order (the first is the default). `injected` replaces loading
    (tests pass fake encoders)."""
    encoders: dict[str, Any] = dict(injected or {})
    if injected is None:
        from clipsearch.embed.multilingual import load_text_encoder

        for alias, path in settings.multilingual_aliases().items():
            logger.info("loading multilingual text encoder %s (%s)", alias, path)
            encoders[alias] = load_text_encoder(path, device=settings.device)
    for alias, enc in encoders.items():
        if int(enc.dim) != dim:
            raise ConfigError(
                f"multilingual model {alias!r} makes {enc.dim}-d vectors but the indices hold {dim}-d vectors",
                hint="--multilingual-model with an encoder aligned to the index's CLIP model",
            )
    return encoders


def pick(value: bool | str | None, encoders: dict[str, Any], field: str) -> str | None:
    """The alias a request's `multilingual` / `use_mclip` value names; None for the index's own model."""
    if value is None or value is False:
        return None
    if not encoders:
        raise InputError(
            f"{field} asks for the multilingual text encoder, but this server has none loaded",
            hint=f"serve --multilingual-model NAME_OR_PATH, or {field}=false",
        )
    if value is True:
        return next(iter(encoders))
    if isinstance(value, str) and value in encoders:
        return value
    raise InputError(
        f"{field}: unknown multilingual model {value!r}",
        hint=f"{field}: true or one of " + ", ".join(encoders),
    )
