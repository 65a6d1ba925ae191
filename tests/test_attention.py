"""The CPU attention formulations (codi_eqx/nn/_attention.py) against jax.nn.dot_product_attention:
the same values and gradients, fp32 and bf16, self- and cross-attention; and which one the CPU
dispatch takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_eqx.nn._attention import (
    BLOCK_QUERIES,
    BLOCKED_MIN_LOGITS,
    _blocked_attention,
    _heads_first_attention,
    blocked_attention_pays,
    dot_product_attention,
)


def _blocked_by_5(q, k, v):
    return _blocked_attention(q, k, v, block=5)  # 12 queries: blocks of 5, 5 and 2


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("t, s", [(12, 12), (12, 5)])
@pytest.mark.parametrize("ours", [_heads_first_attention, _blocked_by_5], ids=["heads_first", "blocked"])
def test_cpu_formulations_match_jax_attention(dtype, tol, t, s, ours):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, t, 3, 8)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, s, 3, 8)), dtype) for _ in range(2))

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))

    with jax.numpy_dtype_promotion("standard"):
        ref, g_ref = jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    with jax.numpy_dtype_promotion("strict"):  # the package's own path is strict-clean
        out, g_out = jax.jit(jax.value_and_grad(loss(jax.vmap(ours)), argnums=(0, 1, 2)))(q, k, v)
        y = jax.vmap(ours)(q, k, v)
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


def test_blocked_equals_heads_first_in_float32():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 12, 3, 8)), jnp.float32)
    k, v, w = (jnp.asarray(rng.standard_normal((2, 12, 3, 8)), jnp.float32) for _ in range(3))

    def grads(f):
        return jax.grad(lambda q, k, v: jnp.sum(jax.vmap(f)(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    np.testing.assert_allclose(jax.vmap(_blocked_by_5)(q, k, v),
                               jax.vmap(_heads_first_attention)(q, k, v), rtol=0, atol=1e-6)
    for a, b in zip(grads(_blocked_by_5), grads(_heads_first_attention)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("t, s, dtypes, pays", [
    (1024, 1024, "fff", True),      # SD1.5's self-attention at 256x256 images
    (4096, 4096, "fff", True),      # and at 512x512
    (1024, 77, "fff", False),       # cross-attention on the text
    (256, 256, "fff", False),       # the 16x16 level
    (BLOCK_QUERIES, BLOCKED_MIN_LOGITS // BLOCK_QUERIES, "fff", False),  # one block only
    (1024, 1024, "fbb", False),     # mixed dtypes stay on the heads-first path
])
def test_blocked_attention_policy(t, s, dtypes, pays):
    dt = {"f": jnp.float32, "b": jnp.bfloat16}
    q, k, v = (jnp.zeros((n, 8, 40), dt[c]) for n, c in zip((t, s, s), dtypes))
    assert blocked_attention_pays(q, k, v) is pays


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU dispatch")
def test_dispatch_on_cpu_takes_the_blocked_path_for_long_sequences():
    q = jax.ShapeDtypeStruct((1024, 2, 8), jnp.float32)
    ours = jax.make_jaxpr(dot_product_attention)(q, q, q)
    assert str(ours) == str(jax.make_jaxpr(_blocked_attention)(q, q, q))
    assert "custom_vjp" in str(ours)


def test_attention_module_on_the_blocked_path_matches_diffusers():
    """A 32x32 feature map (1024 tokens, SD1.5's first level at 256x256 images) goes through
    the blocked path on CPU; the module's output and input gradient equal diffusers'."""
    torch = pytest.importorskip("torch")
    from diffusers.models.attention_processor import Attention as TorchAttention

    import equinox as eqx

    from codi_eqx.nn._attention import Attention

    torch.manual_seed(0)
    ref = TorchAttention(query_dim=16, heads=2, dim_head=8).eval()
    ours = Attention(16, heads=2, dim_head=8, key=jax.random.key(0))
    for name in ("to_q", "to_k", "to_v"):
        ours = eqx.tree_at(lambda m, n=name: getattr(m, n).weight, ours,
                           jnp.asarray(getattr(ref, name).weight.detach().numpy()))
    ours = eqx.tree_at(lambda m: (m.to_out[0].weight, m.to_out[0].bias), ours,
                       (jnp.asarray(ref.to_out[0].weight.detach().numpy()),
                        jnp.asarray(ref.to_out[0].bias.detach().numpy())))
    x = np.random.default_rng(2).standard_normal((1024, 16)).astype(np.float32)
    assert blocked_attention_pays(*(jnp.zeros((1024, 2, 8)),) * 3)

    xt = torch.from_numpy(x[None]).requires_grad_()
    out_t = ref(xt)
    torch.sin(out_t).sum().backward()
    grad = jax.grad(lambda a: jnp.sum(jnp.sin(ours(a))))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), out_t[0].detach().numpy(),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), xt.grad[0].numpy(), rtol=0, atol=1e-5)
