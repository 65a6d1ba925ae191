"""Pytree helpers shared by the models, the training state, the loss and the samplers."""

from __future__ import annotations

from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

T = TypeVar("T")

FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""The parameter / compute dtypes by the names the CLI, the training config and a converted
model's manifest spell them."""


def cast_floating(tree: T, dtype: Any) -> T:
    """`tree` with every inexact (floating or complex) array cast to `dtype`; everything else
    (integer arrays, static fields, non-array leaves) unchanged.

    Used for the compute dtype of a forward pass (float32 master weights cast to bfloat16),
    for the float32 master copy of trained parameters, and for casting a loaded model.

    **Arguments:**

    - `tree`: any pytree, e.g. an Equinox module.
    - `dtype`: the target dtype (`jnp.float32`, `jnp.bfloat16`, ...).

    **Returns:** a pytree of the same structure.
    """
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)
