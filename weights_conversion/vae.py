"""The VAE's name table and folder load / save: now in `codi_eqx.weights`, re-exported here
under their old names."""

from codi_eqx.weights import (
    VAE_NAME_MAP,
    load_vae,
    save_vae,
)

__all__ = ["VAE_NAME_MAP", "load_vae", "save_vae"]
