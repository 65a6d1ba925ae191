"""Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

import functools
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


BLOCK_QUERIES = 128
"""Queries per block of `_blocked_attention`: 128 was the fastest of 32-1024 at 1024 and 4096
tokens (forward and backward) on the machine below."""
BLOCKED_MIN_LOGITS = 1024 * 1024
"""`_blocked_attention` takes over from `_heads_first_attention` on CPU where one head's logits
(queries x keys) reach this many: SD1.5's 1024-token self-attention at 256x256 images and its
4096-token one at 512x512; at 256 tokens it lost (see `_blocked_attention`)."""


def _dot32(a: jax.Array, b: jax.Array, contract: tuple) -> Float[Array, "n x y"]:
    """A batched (over the heads, axis 0) product accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (contract, ((0,), (0,))), preferred_element_type=jnp.float32)


def _blocked_forward(qh, kh, vh, block):
    scale = 1.0 / math.sqrt(qh.shape[-1])
    outs, lses = [], []
    for i in range(0, qh.shape[1], block):
        logits = _dot32(qh[:, i:i + block], kh, ((2,), (2,))) * scale       # (n, b, s)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        outs.append((_dot32(p.astype(vh.dtype), vh, ((2,), (1,))) / total).astype(qh.dtype))
        lses.append((peak + jnp.log(total))[..., 0])
    out = jnp.concatenate(outs, axis=1)
    return out, (qh, kh, vh, out, jnp.concatenate(lses, axis=1))


def _blocked_backward(block, residuals, d_out):
    qh, kh, vh, out, lse = residuals
    scale = 1.0 / math.sqrt(qh.shape[-1])
    # d softmax: p * (dp - sum(d_out * out)) row by row
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)   # (n, t)
    dqs, dk, dv = [], 0.0, 0.0
    for i in range(0, qh.shape[1], block):
        qi, di = qh[:, i:i + block], d_out[:, i:i + block]
        p = jnp.exp(_dot32(qi, kh, ((2,), (2,))) * scale - lse[:, i:i + block, None])
        dv = dv + _dot32(p.astype(vh.dtype), di, ((1,), (1,)))                   # (n, s, h)
        dp = _dot32(di, vh, ((2,), (2,)))                                         # (n, b, s)
        ds = (p * (dp - row[:, i:i + block, None])).astype(qh.dtype)
        dqs.append((_dot32(ds, kh, ((2,), (1,))) * scale).astype(qh.dtype))
        dk = dk + _dot32(ds, qi, ((1,), (1,))) * scale                            # (n, s, h)
    return jnp.concatenate(dqs, axis=1), dk.astype(kh.dtype), dv.astype(vh.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_heads_first(qh, kh, vh, block):
    return _blocked_forward(qh, kh, vh, block)[0]


_blocked_heads_first.defvjp(_blocked_forward, _blocked_backward)


def _blocked_attention(q: Float[Array, "t n h"], k: Float[Array, "s n h"],
                       v: Float[Array, "s n h"], block: int = BLOCK_QUERIES) -> Float[Array, "t n h"]:
    """`_heads_first_attention` computed `block` queries at a time, with a backward pass that
    recomputes each block's probabilities from the saved log-sum-exp instead of keeping them
    (the memory-efficient / flash attention recurrences; Dao et al. 2022, arXiv:2205.14135).
    Logits, softmax and sums in float32; probabilities in the values' dtype for the products
    with the values. One block's logits (heads x block x keys) stay small enough for the CPU's
    caches where the whole `(heads, tokens, tokens)` array did not. Measured on a 2-core x86
    CPU, fp32, 8 heads of 40, forward / forward + backward, against `_heads_first_attention`
    (`python benchmarks/attention_cpu.py`, the sides in turn, median of 5): 1024 tokens,
    batch 1: 30.9 vs 39.7 ms and 88.4 vs 126.8 ms; batch 4: 87.3 vs 161.5 ms and 368.5 vs
    462.9 ms; 4096 tokens, batch 1: 375 vs 528 ms and 1397 vs 2224 ms. At 256 tokens it lost
    (batch 4, forward + backward 46.0 vs 35.0 ms)."""
    qh, kh, vh = (jnp.swapaxes(a, 0, 1) for a in (q, k, v))
    return jnp.swapaxes(_blocked_heads_first(qh, kh, vh, block), 0, 1)


def blocked_attention_pays(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the CPU path takes `_blocked_attention`: one head's logits have at least
    `BLOCKED_MIN_LOGITS` entries, there are at least two blocks of queries, and q, k and v
    share a dtype."""
    t, s = q.shape[-3], k.shape[-3]
    return (t * s >= BLOCKED_MIN_LOGITS and t >= 2 * BLOCK_QUERIES
            and q.dtype == k.dtype == v.dtype)


def dot_product_attention(q: Float[Array, "t n h"], k: Float[Array, "s n h"],
                          v: Float[Array, "s n h"]) -> Float[Array, "t n h"]:
    """One example's multi-head attention, `(tokens, heads, head_dim)`: the fused cuDNN kernel
    where `attention_implementation` picks it; on CPU the blocked formulation for long
    sequences (`blocked_attention_pays`) and the heads-first one otherwise; XLA's lowering of
    `jax.nn.dot_product_attention` elsewhere."""
    implementation = attention_implementation(q, k)
    if implementation is None and jax.default_backend() == "cpu":
        if blocked_attention_pays(q, k, v):
            return _blocked_attention(q, k, v)
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
