"""The UNet and ControlNet (adapter) name table and folder load / save: now in
`codi_eqx.weights`, re-exported here under their old names."""

from codi_eqx.weights import (
    CONTROLNET_NAME_MAP,
    UNET_NAME_MAP,
    load_adapter,
    load_controlnet,
    load_unet,
    save_adapter,
    save_unet,
)

__all__ = ["CONTROLNET_NAME_MAP", "UNET_NAME_MAP", "load_adapter", "load_controlnet", "load_unet", "save_adapter", "save_unet"]
