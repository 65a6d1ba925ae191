"""The CLIP text encoder's name table and folder load / save: now in `codi_eqx.weights`,
re-exported here under their old names."""

from codi_eqx.weights import (
    CLIP_NAME_MAP,
    load_text_encoder,
    save_text_encoder,
)

__all__ = ["CLIP_NAME_MAP", "load_text_encoder", "save_text_encoder"]
