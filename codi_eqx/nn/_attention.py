"""Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

import math
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import GroupNorm, Linear


def attention_implementation(q: jax.Array, k: Optional[jax.Array] = None) -> Optional[str]:
    """The fused cuDNN kernel on NVIDIA GPUs where it applies and pays, XLA's lowering elsewhere
    (chosen at trace time). Measured on an H100 at SD1.5's shapes, forward + backward, bf16
    (`benchmarks/attention_check.py`): 4096 tokens x 8 heads of 40: 2.3 ms fused vs 8.1 ms XLA;
    1024 x 8 x 80: 0.34 vs 0.59 ms; 256 x 8 x 160: 0.18 vs 0.10 ms (slower: head size over
    128 stays on XLA); the 77-token text sequence is refused by the kernel (cross-attention
    stays on XLA)."""
    head_dim = q.shape[-1]
    lengths = (q.shape[-3],) + ((k.shape[-3],) if k is not None else ())
    if (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and all(n % 64 == 0 for n in lengths)
    ):
        return "cudnn"
    return None


def _heads_first_attention(q: Float[Array, "t n h"], k: Float[Array, "s n h"],
                           v: Float[Array, "s n h"]) -> Float[Array, "t n h"]:
    """Softmax attention with the heads as the products' batch axis: the same arithmetic as
    XLA's lowering of `jax.nn.dot_product_attention` (logits and softmax in float32,
    probabilities in the values' dtype), without its `(B, N, T, S)` logits layout, whose
    transposes cost on CPU. Measured on a 2-core x86 CPU, fp32, 8 heads, forward / forward +
    backward, ours vs jax's (`python benchmarks/attention_cpu.py`, the three sides in turn):
    1024 tokens x 40, batch 4: 302 vs 382 ms and 850 vs 965 ms; 4096 x 40, batch 1: 1046 vs
    1564 ms and 2993 vs 4546 ms. On short key sequences (77 text tokens, 256 or 64 positions)
    the two are within a few milliseconds of each other (ratios 0.95-1.55 in that run)."""
    qh, kh, vh = (jnp.swapaxes(a, 0, 1) for a in (q, k, v))
    logits = jax.lax.dot_general(qh, kh, (((2,), (2,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (1.0 / math.sqrt(q.shape[-1])), axis=-1).astype(v.dtype)
    out = jax.lax.dot_general(probs, vh, (((2,), (1,)), ((0,), (0,))))
    return jnp.swapaxes(out, 0, 1).astype(q.dtype)


def dot_product_attention(q: Float[Array, "t n h"], k: Float[Array, "s n h"],
                          v: Float[Array, "s n h"]) -> Float[Array, "t n h"]:
    """One example's multi-head attention, `(tokens, heads, head_dim)`: the fused cuDNN kernel
    where `attention_implementation` picks it, the heads-first formulation on CPU, XLA's
    lowering of `jax.nn.dot_product_attention` elsewhere."""
    implementation = attention_implementation(q, k)
    if implementation is None and jax.default_backend() == "cpu":
        return _heads_first_attention(q, k, v)
    # The library's own reference path promotes internally; keep that out of strict mode.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(eqx.Module):
    """Scaled dot-product attention over a token sequence, fused where the backend allows.

    Used as self-attention (`encoder_hidden_states=None`) or cross-attention. With `group_norm`
    (the VAE's mid-block attention), the input is a feature map `(C, H, W)`: it is normalised,
    attended over its `H*W` positions, and added back to the input (`residual_connection`).
    """

    to_q: Linear
    to_k: Linear
    to_v: Linear
    to_out: tuple[Linear]
    group_norm: Optional[GroupNorm]
    heads: int = eqx.field(static=True)
    upcast_attention: bool = eqx.field(static=True)
    residual_connection: bool = eqx.field(static=True)
    rescale_output_factor: float = eqx.field(static=True)

    def __init__(
        self, query_dim: int, *, heads: int, dim_head: int,
        cross_attention_dim: Optional[int] = None, bias: bool = False,
        upcast_attention: bool = False, norm_num_groups: Optional[int] = None,
        eps: float = 1e-5, residual_connection: bool = False,
        rescale_output_factor: float = 1.0, dtype=jnp.float32, key: PRNGKeyArray,
    ):
        kq, kk, kv, ko = jax.random.split(key, 4)
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.to_q = Linear(query_dim, inner, use_bias=bias, dtype=dtype, key=kq)
        self.to_k = Linear(kv_dim, inner, use_bias=bias, dtype=dtype, key=kk)
        self.to_v = Linear(kv_dim, inner, use_bias=bias, dtype=dtype, key=kv)
        self.to_out = (Linear(inner, query_dim, use_bias=True, dtype=dtype, key=ko),)
        self.group_norm = (
            GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype)
            if norm_num_groups is not None else None
        )
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor

    def attend(
        self, x: Float[Array, "seq dim"], context: Optional[Float[Array, "ctx cdim"]] = None
    ) -> Float[Array, "seq dim"]:
        """Attention on a token sequence (no normalisation, no residual)."""
        context = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        n = self.heads
        q = q.reshape(q.shape[0], n, -1)
        k = k.reshape(k.shape[0], n, -1)
        v = v.reshape(v.shape[0], n, -1)
        dtype = q.dtype
        if self.upcast_attention:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = dot_product_attention(q, k, v)
        out = out.astype(dtype).reshape(out.shape[0], -1)
        return self.to_out[0](out)

    @jax.named_scope("codi_eqx.Attention")
    def __call__(
        self, hidden_states: Float[Array, "..."],
        encoder_hidden_states: Optional[Float[Array, "ctx cdim"]] = None,
    ) -> Float[Array, "..."]:
        residual = hidden_states
        if hidden_states.ndim == 3:
            c, h, w = hidden_states.shape
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states)
            tokens = hidden_states.reshape(c, h * w).T
            out = self.attend(tokens, encoder_hidden_states).T.reshape(c, h, w)
        else:
            if self.group_norm is not None:
                raise ValueError("Attention with group_norm expects a (C, H, W) feature map")
            out = self.attend(hidden_states, encoder_hidden_states)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
