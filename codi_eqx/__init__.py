"""codi-eqx: Conditional Diffusion Distillation (CoDi) of Stable Diffusion in JAX + Equinox."""

__version__ = "0.1.0"
