"""The Stable Diffusion models as Equinox modules (one example in, channels first)."""
