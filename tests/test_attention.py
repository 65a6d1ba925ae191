"""The CPU attention formulation (codi_eqx/nn/_attention.py) against jax.nn.dot_product_attention:
the same values and gradients, fp32 and bf16, self- and cross-attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_eqx.nn._attention import _heads_first_attention, dot_product_attention


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("t, s", [(12, 12), (12, 5)])
def test_heads_first_matches_jax_attention(dtype, tol, t, s):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, t, 3, 8)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, s, 3, 8)), dtype) for _ in range(2))

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))

    with jax.numpy_dtype_promotion("standard"):
        ref, g_ref = jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    with jax.numpy_dtype_promotion("strict"):  # the package's own path is strict-clean
        out, g_out = jax.value_and_grad(loss(jax.vmap(_heads_first_attention)), argnums=(0, 1, 2))(q, k, v)
        y = jax.vmap(_heads_first_attention)(q, k, v)
    assert y.dtype == dtype
    assert abs(float(out) - float(ref)) <= tol * max(1.0, abs(float(ref)))
    for a, b in zip(g_out, g_ref):
        assert a.dtype == b.dtype == dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU dispatch")
def test_dispatch_on_cpu_is_heads_first():
    q = jnp.ones((4, 2, 8))
    ours = jax.make_jaxpr(dot_product_attention)(q, q, q)
    assert str(ours) == str(jax.make_jaxpr(_heads_first_attention)(q, q, q))
