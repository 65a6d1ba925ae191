"""The convolution's matrix-product gradients (codi_eqx/nn/_conv.py): the same derivatives as
XLA's convolution gradients, in the compiled code where the policy picks them, and the UNet's
gradients still those of diffusers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import make_unet

from codi_eqx._hlo import convolutions
from codi_eqx.nn import _conv
from codi_eqx.nn._conv import conv2d, conv2d_matmul_gradient, matmul_gradient_pays
from weights_conversion import load_unet


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _plain(x, w, stride, padding):
    return jax.lax.conv_general_dilated(
        x[None], w, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NCHW", "HWIO", "NCHW"),
    )[0]


# kernel, stride, padding, cin, cout, h, w
CASES = [
    (3, 1, 1, 6, 16, 4, 5),
    (3, 2, 1, 6, 16, 7, 5),   # the UNet's downsampler, odd sizes
    (3, 2, 0, 5, 8, 8, 9),    # the VAE's (padded right and bottom before)
    (1, 1, 0, 12, 8, 3, 3),   # shortcut and zero convolutions
    (3, 1, 0, 4, 7, 6, 6),
]


@pytest.mark.parametrize("k, stride, padding, cin, cout, h, w", CASES)
def test_matmul_gradient_matches_xla_gradient(k, stride, padding, cin, cout, h, w):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, cin, h, w)), jnp.float32)  # a batch, vmapped
    wt = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    probe = jnp.asarray(rng.standard_normal(jax.vmap(lambda e: _plain(e, wt, stride, padding))(x).shape),
                        jnp.float32)

    def loss(conv):
        return lambda x, wt: jnp.sum(jax.vmap(lambda e: conv(e, wt, stride, padding))(x) * probe)

    ours = jax.jit(jax.value_and_grad(loss(conv2d_matmul_gradient), argnums=(0, 1)))(x, wt)
    plain = jax.jit(jax.value_and_grad(loss(_plain), argnums=(0, 1)))(x, wt)
    assert float(ours[0]) == float(plain[0])  # the same forward convolution
    for g, r in zip(ours[1], plain[1]):
        assert g.shape == r.shape
        assert _rel(g, r) <= 1e-5

    # forward mode too: the rule is a JVP
    tx, tw = (jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in (x, wt))
    _, t_ours = jax.jvp(loss(conv2d_matmul_gradient), (x, wt), (tx, tw))
    _, t_plain = jax.jvp(loss(_plain), (x, wt), (tx, tw))
    assert abs(float(t_ours) - float(t_plain)) <= 1e-4 * abs(float(t_plain))


def test_policy():
    # SD1.5 at 32x32 latents: the 8x8 and 4x4 levels take matrix-product gradients, 32x32 not.
    assert matmul_gradient_pays((2560, 8, 8), (3, 3, 2560, 1280), 1, 1, "cpu")
    assert matmul_gradient_pays((1280, 4, 4), (3, 3, 1280, 1280), 1, 1, "cpu")
    assert matmul_gradient_pays((1280, 16, 16), (3, 3, 1280, 1280), 2, 1, "cpu")  # to 8x8
    assert not matmul_gradient_pays((320, 32, 32), (3, 3, 320, 320), 1, 1, "cpu")
    assert not matmul_gradient_pays((640, 16, 16), (3, 3, 640, 640), 1, 1, "cpu")
    assert not matmul_gradient_pays((2560, 8, 8), (3, 3, 2560, 1280), 1, 1, "gpu")
    assert not matmul_gradient_pays((2560, 8, 8), (3, 3, 2560, 1280), 1, 1, "tpu")


def _compiled_convolutions(x_shape, w_shape):
    x = jnp.ones(x_shape, jnp.float32)
    wt = jnp.ones(w_shape, jnp.float32) * 0.1
    grad = jax.jit(jax.grad(lambda x, wt: jnp.sum(jax.vmap(lambda e: conv2d(e, wt, padding=1))(x) ** 2),
                            argnums=(0, 1)))
    return convolutions(grad.lower(x, wt).compile().as_text())


def test_compiled_gradient_is_matrix_products_where_the_policy_says():
    # 64 channels out on 3x3 positions: the input and weight gradients are dots, only the
    # forward convolution is left.
    assert matmul_gradient_pays((8, 3, 3), (3, 3, 8, 64), 1, 1, jax.default_backend())
    assert len(_compiled_convolutions((2, 8, 3, 3), (3, 3, 8, 64))) == 1
    # 8 channels on 8x8: XLA's three convolutions (forward, input and weight gradients).
    assert len(_compiled_convolutions((2, 8, 8, 8), (3, 3, 8, 8))) == 3


# Two levels, 16 and 32 channels: on 4x4 latents the lower level's 2x2 feature maps take the
# matrix-product gradients at the policy's ratio, the upper level's 4x4 ones do not.
GRAD_UNET = dict(
    sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8,
)


@pytest.fixture(scope="module")
def grad_unet(tmp_path_factory):
    torch_unet = make_unet(GRAD_UNET, seed=3)
    folder = tmp_path_factory.mktemp("grad_unet") / "unet"
    torch_unet.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    t = np.array([10, 731], np.int64)
    ehs = rng.standard_normal((2, 7, GRAD_UNET["cross_attention_dim"])).astype(np.float32)
    probe = rng.standard_normal(sample.shape).astype(np.float32)
    xs = torch.from_numpy(sample).requires_grad_(True)
    out = torch_unet(xs, torch.from_numpy(t), torch.from_numpy(ehs)).sample
    (out * torch.from_numpy(probe)).sum().backward()

    def hwio(conv):
        return conv.weight.grad.numpy().transpose(2, 3, 1, 0)

    ref = {
        "sample": xs.grad.numpy(),
        "conv_in": hwio(torch_unet.conv_in),
        "down0 downsampler": hwio(torch_unet.down_blocks[0].downsamplers[0].conv),
        "down1 conv2": hwio(torch_unet.down_blocks[1].resnets[0].conv2),
        "mid conv1": hwio(torch_unet.mid_block.resnets[0].conv1),
        "up0 conv1": hwio(torch_unet.up_blocks[0].resnets[0].conv1),
        "up0 shortcut": hwio(torch_unet.up_blocks[0].resnets[0].conv_shortcut),
        "up1 conv2": hwio(torch_unet.up_blocks[1].resnets[1].conv2),
    }
    return load_unet(folder), (sample, t, ehs, probe), ref


@pytest.mark.parametrize("ratio", ["policy", "all", "none"])
def test_unet_gradients_match_diffusers(grad_unet, ratio, monkeypatch):
    """Input and weight gradients of a tiny UNet against PyTorch autograd, with the
    matrix-product gradients as the policy picks them, on every convolution, on none."""
    unet, (sample, t, ehs, probe), ref = grad_unet
    value = {"policy": _conv.MATMUL_GRADIENT_RATIO, "all": 0, "none": 10**9}[ratio]
    monkeypatch.setattr(_conv, "MATMUL_GRADIENT_RATIO", value)

    def loss(unet, x):
        y = jax.vmap(unet)(x, jnp.asarray(t, jnp.int32), jnp.asarray(ehs))
        return jnp.sum(y * probe)

    g_unet, g_x = eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))(unet, jnp.asarray(sample))
    ours = {
        "sample": g_x,
        "conv_in": g_unet.conv_in.weight,
        "down0 downsampler": g_unet.down_blocks[0].downsamplers[0].conv.weight,
        "down1 conv2": g_unet.down_blocks[1].resnets[0].conv2.weight,
        "mid conv1": g_unet.mid_block.resnets[0].conv1.weight,
        "up0 conv1": g_unet.up_blocks[0].resnets[0].conv1.weight,
        "up0 shortcut": g_unet.up_blocks[0].resnets[0].conv_shortcut.weight,
        "up1 conv2": g_unet.up_blocks[1].resnets[1].conv2.weight,
    }
    for name, r in ref.items():
        err = _rel(ours[name], r)
        print(f"[parity] UNet gradient {name}, matmul gradients {ratio}: {err:.2e}")
        assert err <= 1e-4, (name, err)
