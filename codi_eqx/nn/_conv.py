"""The 2-D convolution of one `(C, H, W)` example, with gradients as matrix products where
XLA:CPU's own convolution gradients lose.

The forward pass is always XLA's convolution. Its reverse-mode gradients, as JAX derives them,
are two more convolutions: the input gradient convolves the output gradient with the kernel
flipped and its in/out axes swapped, the weight gradient convolves the input with the output
gradient. XLA:CPU's Eigen kernels take both operands channels-last, so each of the two
materialises a transposed copy of a weight-sized array: the swapped kernel before the input
gradient, and the weight gradient itself after it, whose natural layout is `(in, kh, kw, out)`.
Where the feature map is small and the kernel large (the SD UNet's 8x8 and 4x4 levels:
1280-2560 channels on 64 or 16 positions), those copies cost more than the arithmetic.

`conv2d_matmul_gradient` keeps the forward convolution and states its derivative (a custom
JVP) as a matrix product over the unfolded input (im2col): the tangent is
`W[(kh kw in), out]^T @ cols(x_dot)` plus `W_dot^T @ cols(x)`. JAX transposes that linear map
into two matrix products and a fold (the transpose of the unfolding: shifted adds), both in the
layout the weight already has, and under `vmap` the weight gradient's product contracts over the
batch and the positions at once. Measured on a 2-core x86 CPU (fp32, median of 5, forward +
gradient of input and weight; matrix-product / XLA's gradients / PyTorch;
`python benchmarks/conv_gradients.py`): 2560->1280 channels at 8x8, batch 1: 127 / 290 / 401 ms;
1280->1280 at 4x4, batch 4: 80 / 151 / 261 ms; the input gradient alone (a frozen network),
2560->1280 at 8x8: 41 / 203 / 212 ms. At larger feature maps XLA's gradients win (640->640 at
16x16, batch 4: 191 vs 140 ms; 320->320 at 32x32: 80 vs 64 ms), so `matmul_gradient_pays`
picks per shape: out channels at least `MATMUL_GRADIENT_RATIO` times the output positions,
on the CPU backend only (other backends' convolution libraries take the kernel in either
layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

MATMUL_GRADIENT_RATIO = 4
"""Matrix-product gradients where `out_channels >= ratio * out_height * out_width`."""


def _conv(x, w, stride: int, padding: int):
    p = padding
    return jax.lax.conv_general_dilated(
        x[None], w, window_strides=(stride, stride), padding=((p, p), (p, p)),
        dimension_numbers=("NCHW", "HWIO", "NCHW"),
    )[0]


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def unfold(x: Float[Array, "c h w"], kernel: int, stride: int, padding: int
           ) -> Float[Array, "kkc hw"]:
    """im2col: the input patch of every output position, rows ordered `(kh, kw, c)` as the
    HWIO kernel's leading axes flatten."""
    c, h, w = x.shape
    ho, wo = output_size(h, kernel, stride, padding), output_size(w, kernel, stride, padding)
    if kernel == 1 and stride == 1 and padding == 0:
        return x.reshape(c, h * w)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding))) if padding else x
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    taps = [
        xp[:, i:i + span_h:stride, j:j + span_w:stride]
        for i in range(kernel) for j in range(kernel)
    ]
    return jnp.stack(taps).reshape(kernel * kernel * c, ho * wo)


def conv2d_as_matmul(x: Float[Array, "cin h w"], weight: Float[Array, "kh kw cin cout"],
                     stride: int, padding: int) -> Float[Array, "cout ho wo"]:
    """The convolution as one matrix product over the unfolded input (linear in each of
    `x` and `weight`)."""
    k, _, cin, cout = weight.shape
    ho = output_size(x.shape[1], k, stride, padding)
    wo = output_size(x.shape[2], k, stride, padding)
    cols = unfold(x, k, stride, padding)
    y = jax.lax.dot_general(weight.reshape(k * k * cin, cout), cols, (((0,), (0,)), ((), ())))
    return y.reshape(cout, ho, wo)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv2d_matmul_gradient(x: Float[Array, "cin h w"], weight: Float[Array, "kh kw cin cout"],
                           stride: int, padding: int) -> Float[Array, "cout ho wo"]:
    """XLA's convolution forward; derivatives through `conv2d_as_matmul`."""
    return _conv(x, weight, stride, padding)


@conv2d_matmul_gradient.defjvp
def _conv2d_matmul_gradient_jvp(stride, padding, primals, tangents):
    x, weight = primals
    x_dot, weight_dot = tangents
    y = _conv(x, weight, stride, padding)
    y_dot = conv2d_as_matmul(x_dot, weight, stride, padding) + conv2d_as_matmul(
        x, weight_dot, stride, padding
    )
    return y, y_dot


def matmul_gradient_pays(x_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                         stride: int, padding: int, backend: str) -> bool:
    """The shapes where `conv2d_matmul_gradient` beats XLA's convolution gradients (CPU)."""
    if backend != "cpu":
        return False
    k, cout = weight_shape[0], weight_shape[-1]
    positions = output_size(x_shape[-2], k, stride, padding) * output_size(
        x_shape[-1], k, stride, padding
    )
    return cout >= MATMUL_GRADIENT_RATIO * positions


def conv2d(x: Float[Array, "cin h w"], weight: Float[Array, "kh kw cin cout"], *,
           stride: int = 1, padding: int = 0) -> Float[Array, "cout ho wo"]:
    """One example's convolution (HWIO kernel, symmetric zero padding), with the gradient
    formulation `matmul_gradient_pays` picks at trace time for the default backend."""
    if matmul_gradient_pays(x.shape, weight.shape, stride, padding, jax.default_backend()):
        return conv2d_matmul_gradient(x, weight, stride, padding)
    return _conv(x, weight, stride, padding)
