"""AutoencoderKL: parity with diffusers on a tiny random config, loading, saving, errors."""

import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_eqx.models import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from weights_conversion import WeightsError, export_state, read_tensors, save_file
from weights_conversion.vae import VAE_NAME_MAP, load_vae, save_vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)
BATCH, HEIGHT, WIDTH = 2, 16, 24  # non-square; divisible by the downsample factor 2
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _randomise(model):
    """Fill every parameter with small random values that keep activations of order one."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    return _randomise(diffusers.AutoencoderKL(**CONFIG)).eval()


@pytest.fixture(scope="module")
def vae_dir(torch_vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch_vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(torch_vae):
    """Images, latents, and diffusers' posterior and decoding of them."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (BATCH, 3, HEIGHT, WIDTH)).astype(np.float32)
    z = rng.standard_normal((BATCH, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    with torch.no_grad():
        post = torch_vae.encode(torch.from_numpy(x)).latent_dist
        dec = torch_vae.decode(torch.from_numpy(z)).sample
    return dict(x=x, z=z, mean=post.mean.numpy(), logvar=post.logvar.numpy(), dec=dec.numpy())


@eqx.filter_jit
def _run(vae, x, z):
    post = jax.vmap(vae.encode)(x)
    return post.mean, post.logvar, jax.vmap(vae.decode)(z)


@pytest.fixture(scope="module")
def ours_fp32(vae_dir, reference):
    vae = load_vae(vae_dir)
    return _run(vae, jnp.asarray(reference["x"]), jnp.asarray(reference["z"]))


def _rel(ours, theirs) -> float:
    ours = np.asarray(jnp.asarray(ours, jnp.float32))
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_parity_fp32(ours_fp32, reference):
    mean, logvar, dec = ours_fp32
    assert mean.shape == (BATCH, 4, HEIGHT // 2, WIDTH // 2)
    assert dec.shape == (BATCH, 3, HEIGHT, WIDTH)
    for name, ours in zip(("mean", "logvar", "decode"), (mean, logvar, dec)):
        theirs = reference["dec" if name == "decode" else name]
        err = _rel(ours, theirs)
        print(f"\nVAE fp32 {name}: max|ours - diffusers| / max|diffusers| = {err:.2e}")
        assert ours.dtype == jnp.float32
        assert err <= 1e-4


def test_parity_bf16(vae_dir, ours_fp32, reference):
    vae = load_vae(vae_dir, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(eqx.filter(vae, eqx.is_array)))
    outs = _run(vae, jnp.asarray(reference["x"], jnp.bfloat16),
                jnp.asarray(reference["z"], jnp.bfloat16))
    for name, ours, ref in zip(("mean", "logvar", "decode"), outs, ours_fp32):
        assert ours.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(ours)))
        err = _rel(ours, np.asarray(ref))
        print(f"\nVAE bf16 {name}: max|bf16 - fp32| / max|fp32| = {err:.2e}")
        assert err <= 3e-2


def test_posterior():
    mean = jnp.zeros((4, 2, 3))
    post = DiagonalGaussianDistribution(mean, jnp.full((4, 2, 3), -100.0))
    assert float(post.logvar.min()) == -30.0
    assert DiagonalGaussianDistribution(mean, jnp.full((4, 2, 3), 50.0)).logvar.max() == 20.0
    post = DiagonalGaussianDistribution(mean + 1.0, jnp.full((4, 2, 3), 2.0 * np.log(3.0)))
    np.testing.assert_allclose(post.std, 3.0, rtol=1e-6)
    assert post.mode() is post.mean
    key = jax.random.key(0)
    eps = jax.random.normal(key, (4, 2, 3))
    np.testing.assert_allclose(post.sample(key), 1.0 + 3.0 * eps, rtol=1e-6)


def test_config_from_dict(vae_dir):
    d = json.loads((vae_dir / "config.json").read_text())
    config = AutoencoderKLConfig.from_dict(d)
    assert config.block_out_channels == (32, 64) and config.norm_num_groups == 8
    assert config.scaling_factor == 0.18215 and config.shift_factor is None
    assert AutoencoderKLConfig.from_dict(config.to_dict()) == config
    for key, value in [("act_fn", "gelu"), ("down_block_types", ["AttnDownEncoderBlock2D"] * 2),
                       ("up_block_types", ["UpDecoderBlock2D"]), ("norm_num_groups", 7)]:
        with pytest.raises(ValueError, match=key):
            AutoencoderKLConfig.from_dict({**d, key: value})


def test_shapes_from_config():
    config = AutoencoderKLConfig.from_dict(
        {**CONFIG, "use_quant_conv": False, "use_post_quant_conv": False,
         "mid_block_add_attention": False}
    )
    vae = eqx.filter_eval_shape(AutoencoderKL, config, key=jax.random.key(0))
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert vae.encoder.mid_block.attentions == (None,)
    post = eqx.filter_eval_shape(vae.encode, jax.ShapeDtypeStruct((3, 8, 12), jnp.float32))
    assert post.mean.shape == (4, 4, 6)
    out = eqx.filter_eval_shape(vae.decode, jax.ShapeDtypeStruct((4, 4, 6), jnp.float32))
    assert out.shape == (3, 8, 12)


def _identical(a, b) -> bool:
    """Same structure, static fields, dtypes and bits (checked in numpy: fast, exact)."""
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    return ta == tb and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def _write(folder, src, tensors):
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    save_file(tensors, folder / WEIGHTS)
    return folder


def _tensors(folder):
    return {k: np.array(v) for k, v in read_tensors(folder).items()}


def test_load_errors(vae_dir, tmp_path):
    tensors = _tensors(vae_dir)
    name = "decoder.up_blocks.1.resnets.1.conv2.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(WeightsError, match="missing.*" + name.replace(".", r"\.")):
        load_vae(_write(tmp_path / "missing", vae_dir, missing))
    extra = {**tensors, "encoder.mid_block.resnets.2.conv1.weight": tensors[name]}
    with pytest.raises(WeightsError, match=r"unexpected.*encoder\.mid_block\.resnets\.2\.conv1"):
        load_vae(_write(tmp_path / "extra", vae_dir, extra))
    wrong = {**tensors, "encoder.conv_in.bias": np.zeros(33, np.float32)}
    with pytest.raises(WeightsError, match=r"wrong shape.*encoder\.conv_in\.bias"):
        load_vae(_write(tmp_path / "wrong", vae_dir, wrong))


def test_legacy_attention_names(vae_dir, tmp_path):
    tensors = _tensors(vae_dir)
    legacy = {}
    for k, v in tensors.items():
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")]:
            if ".attentions.0." + new + "." in k:
                k = k.replace(new, old)
                v = v[:, :, None, None] if v.ndim == 2 else v
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    ours = load_vae(_write(tmp_path / "legacy", vae_dir, legacy))
    ref = load_vae(vae_dir)
    assert _identical(ours, ref)


def test_fp16_variant(torch_vae, tmp_path):
    half = diffusers.AutoencoderKL(**CONFIG)
    half.load_state_dict(torch_vae.state_dict())
    half.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    vae = load_vae(tmp_path, variant="fp16")
    expected = {k: v.numpy().astype(np.float32) for k, v in half.state_dict().items()}
    got = export_state(vae, VAE_NAME_MAP)
    assert got.keys() == expected.keys()
    for k, v in got.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_save_load_round_trip(vae_dir, torch_vae, tmp_path):
    vae = load_vae(vae_dir)
    save_vae(vae, tmp_path / "out")
    again = load_vae(tmp_path / "out")
    assert _identical(vae, again)
    bf16 = load_vae(vae_dir, dtype=jnp.bfloat16)
    save_vae(bf16, tmp_path / "bf16")
    assert _identical(bf16, load_vae(tmp_path / "bf16", dtype=jnp.bfloat16))
    # diffusers reads what we write, bit for bit.
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out", low_cpu_mem_usage=False)
    assert AutoencoderKLConfig.from_dict(theirs.config) == vae.config
    ref = torch_vae.state_dict()
    state = theirs.state_dict()
    assert state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
