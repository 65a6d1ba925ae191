"""UNet and adapter parity against diffusers (PyTorch, CPU) on tiny random configs."""

import copy
import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from helpers import SD1_UNET, SD2_UNET, SDXL_UNET, make_unet, perturb, randomize_

from codi_eqx.models import ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel
from codi_eqx.nn import Conv2d, Linear
from weights_conversion import (
    SafetensorsFile,
    WeightsError,
    load_adapter,
    load_unet,
    save_adapter,
    save_file,
    save_unet,
)

FAMILIES = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}
B, H, W, L = 2, 8, 12, 7  # batch, non-square latents, text length


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _inputs(cfg: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((B, 4, H, W)).astype(np.float32)
    t = np.array([10, 731], np.int64)
    ehs = rng.standard_normal((B, L, cfg["cross_attention_dim"])).astype(np.float32)
    cond = rng.uniform(0, 1, (B, 3, 8 * H, 8 * W)).astype(np.float32)
    return sample, t, ehs, cond, _added(cfg, rng)


def _added(cfg: dict, rng):
    """SDXL's added conditions (pooled text embedding, time ids) for a `text_time` config,
    else None."""
    if cfg.get("addition_embed_type") != "text_time":
        return None
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return {
        "text_embeds": rng.standard_normal((B, pooled)).astype(np.float32),
        # original size, crop top-left, target size (pixels), one example cropped
        "time_ids": np.array([[96, 64, 0, 0, 64, 96], [128, 80, 16, 8, 64, 96]], np.float32),
    }


def _torch_added(added) -> dict:
    if added is None:
        return {}
    return {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}


def _jnp(added):
    return None if added is None else {k: jnp.asarray(v) for k, v in added.items()}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    cfg = FAMILIES[name]
    folder = tmp_path_factory.mktemp(name) / "unet"
    torch_unet = make_unet(cfg, seed=1)
    torch_unet.save_pretrained(folder, safe_serialization=True)
    return name, cfg, torch_unet, folder


def _run_unet(unet, sample, t, ehs, added=None, down=None, mid=None):
    def one(x, ti, e, a, d, m):
        return unet(x, ti, e, added_cond_kwargs=a, down_block_additional_residuals=d,
                    mid_block_additional_residual=m)

    return eqx.filter_jit(jax.vmap(one))(
        jnp.asarray(sample), jnp.asarray(t, jnp.int32), jnp.asarray(ehs), _jnp(added), down, mid)


def test_unet_parity(family):
    name, cfg, torch_unet, folder = family
    sample, t, ehs, _, added = _inputs(cfg)
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
                         **_torch_added(added)).sample.numpy()
    unet = load_unet(folder)
    out = _run_unet(unet, sample, t, ehs, added)
    err = _rel(out, ref)
    print(f"[parity] UNet {name} fp32: max|ours-theirs|/max|theirs| = {err:.2e}")
    assert err <= 1e-4

    unet16 = load_unet(folder, dtype=jnp.bfloat16)
    out16 = _run_unet(unet16, sample, t, ehs, added)
    assert out16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out16)))
    err16 = _rel(out16.astype(jnp.float32), out)
    print(f"[parity] UNet {name} bf16 vs fp32: {err16:.2e}")
    assert err16 <= 3e-2


@pytest.mark.parametrize("with_cond", [True, False])
def test_unet_with_diffusers_controlnet(family, with_cond, tmp_path):
    name, cfg, torch_unet, folder = family
    sample, t, ehs, cond, added = _inputs(cfg, seed=1)
    tcn = TorchControlNet.from_unet(torch_unet, conditioning_channels=3).eval()
    randomize_(tcn, seed=7)
    if not with_cond:
        # A condition encoder whose output is exactly zero stands for "no condition image".
        with torch.no_grad():
            tcn.controlnet_cond_embedding.conv_out.weight.zero_()
            tcn.controlnet_cond_embedding.conv_out.bias.zero_()
    with torch.no_grad():
        down, mid = tcn(
            torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
            controlnet_cond=torch.from_numpy(cond), conditioning_scale=0.7, return_dict=False,
            **_torch_added(added),
        )
        ref = torch_unet(
            torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
            **_torch_added(added),
        ).sample.numpy()
    cn_dir = tmp_path / "controlnet"
    tcn.save_pretrained(cn_dir, safe_serialization=True)
    if not with_cond:
        f = SafetensorsFile(cn_dir / "diffusion_pytorch_model.safetensors")
        kept = {k: np.array(f[k]) for k in f if not k.startswith("controlnet_cond_embedding.")}
        save_file(kept, cn_dir / "diffusion_pytorch_model.safetensors")
        config = json.loads((cn_dir / "config.json").read_text())
        config["conditioning_channels"] = None
        (cn_dir / "config.json").write_text(json.dumps(config))
    adapter = load_adapter(cn_dir)
    assert (adapter.controlnet_cond_embedding is None) == (not with_cond)
    unet = load_unet(folder)

    def one(x, ti, e, c, a):
        d, m = adapter(x, ti, e, c if with_cond else None, conditioning_scale=0.7,
                       added_cond_kwargs=a)
        return d, m, unet(x, ti, e, added_cond_kwargs=a, down_block_additional_residuals=d,
                          mid_block_additional_residual=m)

    d_ours, m_ours, out = eqx.filter_jit(jax.vmap(one))(
        jnp.asarray(sample), jnp.asarray(t, jnp.int32), jnp.asarray(ehs), jnp.asarray(cond),
        _jnp(added),
    )
    errs = [_rel(a, b.numpy()) for a, b in zip(d_ours, down)]
    err_mid = _rel(m_ours, mid.numpy())
    err = _rel(out, ref)
    label = "with" if with_cond else "without"
    print(
        f"[parity] ControlNet {name} {label} condition: residuals max {max(errs):.2e}, "
        f"mid {err_mid:.2e}; UNet+residuals {err:.2e}"
    )
    assert max(errs) <= 1e-4 and err_mid <= 1e-4 and err <= 1e-4


@pytest.mark.parametrize("channels", [3, None])
def test_fresh_adapter_leaves_unet_unchanged(family, channels):
    name, cfg, _, folder = family
    sample, t, ehs, cond, added = _inputs(cfg, seed=2)
    unet = load_unet(folder)
    adapter = ControlNetModel.from_unet(unet, conditioning_channels=channels, key=jax.random.key(3))
    # The copied encoder is the UNet's own (the added embedding too, where there is one).
    assert bool(jnp.all(adapter.conv_in.weight == unet.conv_in.weight))
    assert eqx.tree_equal(adapter.add_embedding, unet.add_embedding)

    def one(x, ti, e, c, a):
        d, m = adapter(x, ti, e, c if channels else None, added_cond_kwargs=a)
        out = unet(x, ti, e, added_cond_kwargs=a, down_block_additional_residuals=d,
                   mid_block_additional_residual=m)
        return out, (d, m)

    with_adapter, residuals = eqx.filter_jit(jax.vmap(one))(
        jnp.asarray(sample), jnp.asarray(t, jnp.int32), jnp.asarray(ehs), jnp.asarray(cond),
        _jnp(added),
    )
    # The zero convolutions give exactly zero residuals (whatever the compile flags).
    for r in jax.tree.leaves(residuals):
        assert not np.any(np.asarray(r)), "a fresh adapter's residual is not zero"
    alone = _run_unet(unet, sample, t, ehs, added)
    # Bit for bit at XLA's default settings (the slow set); the default set's fast-compile
    # flags (tests/conftest.py) fuse the two programs differently, within float noise (2e-6
    # measured). An adapter residual that is not zero moves the output by far more.
    np.testing.assert_allclose(np.asarray(with_adapter), np.asarray(alone), rtol=0, atol=1e-5)


def test_adapter_save_load_round_trip(family, tmp_path):
    _, _, _, folder = family
    unet = load_unet(folder)
    for channels in (3, None):
        adapter = ControlNetModel.from_unet(unet, conditioning_channels=channels, key=jax.random.key(0))
        save_adapter(adapter, tmp_path / f"a{channels}")
        back = load_adapter(tmp_path / f"a{channels}")
        assert eqx.tree_equal(adapter, back)


def test_adapter_with_condition_loads_in_diffusers(family, tmp_path):
    """An adapter saved by this project, loaded by diffusers' ControlNetModel, gives our
    residuals (fp32 parity bound)."""
    _, cfg, _, folder = family
    unet = load_unet(folder)
    adapter = ControlNetModel.from_unet(unet, conditioning_channels=3, key=jax.random.key(0))
    # Non-zero zero convs, so that every residual carries the weights through.
    adapter = perturb(adapter, jax.random.key(4))
    save_adapter(adapter, tmp_path / "a")
    tcn = TorchControlNet.from_pretrained(tmp_path / "a").eval()
    assert tcn.config.conditioning_channels == 3
    sample, t, ehs, cond, added = _inputs(cfg, seed=3)
    with torch.no_grad():
        down, mid = tcn(
            torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
            controlnet_cond=torch.from_numpy(cond), conditioning_scale=0.7, return_dict=False,
            **_torch_added(added),
        )
    d_ours, m_ours = eqx.filter_jit(jax.vmap(
        lambda x, ti, e, c, a: adapter(x, ti, e, c, conditioning_scale=0.7, added_cond_kwargs=a)
    ))(jnp.asarray(sample), jnp.asarray(t, jnp.int32), jnp.asarray(ehs), jnp.asarray(cond),
       _jnp(added))
    assert len(d_ours) == len(down)
    errs = [_rel(a, b.numpy()) for a, b in zip(d_ours, down)] + [_rel(m_ours, mid.numpy())]
    assert min(float(np.abs(b.numpy()).max()) for b in down) > 1e-3
    assert max(errs) <= 1e-4, errs


def test_unet_save_load_round_trip(family, tmp_path):
    _, _, _, folder = family
    unet = load_unet(folder)
    save_unet(unet, tmp_path / "u")
    assert eqx.tree_equal(unet, load_unet(tmp_path / "u"))


def _rewrite(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    f = SafetensorsFile(path)
    tensors = {k: np.array(f[k]) for k in f}
    del f
    edit(tensors)
    save_file(tensors, path)


def test_loading_errors_name_the_tensor(family, tmp_path):
    _, _, _, folder = family
    unet = load_unet(folder)
    victim = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"

    save_unet(unet, tmp_path / "missing")
    _rewrite(tmp_path / "missing", lambda t: t.pop(victim))
    with pytest.raises(WeightsError, match="missing.*" + victim.replace(".", r"\.")):
        load_unet(tmp_path / "missing")

    save_unet(unet, tmp_path / "extra")
    _rewrite(tmp_path / "extra", lambda t: t.__setitem__("surprise.weight", np.zeros(3, np.float32)))
    with pytest.raises(WeightsError, match=r"unexpected.*surprise\.weight"):
        load_unet(tmp_path / "extra")

    save_unet(unet, tmp_path / "shape")
    _rewrite(tmp_path / "shape", lambda t: t.__setitem__("conv_in.bias", np.zeros(5, np.float32)))
    with pytest.raises(WeightsError, match=r"wrong shape.*conv_in\.bias \(5,\) \(expected \(32,\)\)"):
        load_unet(tmp_path / "shape")


def test_fp16_variant_loads_into_float32(family, tmp_path):
    _, _, torch_unet, folder = family
    copy.deepcopy(torch_unet).half().save_pretrained(
        tmp_path / "u16", safe_serialization=True, variant="fp16"
    )
    assert (tmp_path / "u16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    unet = load_unet(tmp_path / "u16", dtype=jnp.float32)
    assert {a.dtype for a in jax.tree.leaves(eqx.filter(unet, eqx.is_array))} == {jnp.dtype(jnp.float32)}
    # Every weight is the fp32 one rounded to fp16 (as torch's .half() rounds), then widened.
    ref = load_unet(folder)
    via16 = jax.tree.map(
        lambda a: a.astype(jnp.float16).astype(jnp.float32) if eqx.is_inexact_array(a) else a, ref)
    assert bool(eqx.tree_equal(unet, via16))


def test_sharded_checkpoint_loads(family, tmp_path):
    _, _, torch_unet, folder = family
    torch_unet.save_pretrained(tmp_path / "sh", safe_serialization=True, max_shard_size="100KB")
    assert list((tmp_path / "sh").glob("*.index.json"))
    assert eqx.tree_equal(load_unet(tmp_path / "sh"), load_unet(folder))


def test_unet_is_a_pytree_of_the_config(family):
    """The loaded UNet's tree is the one its config describes: block, resnet, transformer and
    head counts, and every weight shape derived from the config's channels; a model built
    from the same config has the same tree structure and leaf shapes, a changed config not."""
    _, cfg, _, folder = family
    unet = load_unet(folder)
    assert isinstance(unet, UNet2DConditionModel)
    c = unet.config
    assert c == UNet2DConditionConfig.from_dict(json.loads((folder / "config.json").read_text()))
    n = len(cfg["block_out_channels"])
    assert c.block_out_channels == tuple(cfg["block_out_channels"])
    heads = cfg["attention_head_dim"]  # SD 1.x / 2.x: diffusers' name for the head count
    heads = tuple(heads) if isinstance(heads, list) else (heads,) * n
    assert c.num_attention_heads == heads
    cross = cfg["cross_attention_dim"]
    layers = cfg["layers_per_block"]
    tlayers = tuple(cfg.get("transformer_layers_per_block", [1] * n))
    only_cross = cfg.get("only_cross_attention", False)
    only_cross = tuple(only_cross) if isinstance(only_cross, list) else (only_cross,) * n
    linear = cfg.get("use_linear_projection", False)
    ch = cfg["block_out_channels"]
    temb = 4 * ch[0]

    def conv(m, cin, cout, k):
        assert m.weight.shape == (k, k, cin, cout) and m.bias.shape == (cout,)

    def resnet(r, cin, cout):
        conv(r.conv1, cin, cout, 3)
        conv(r.conv2, cout, cout, 3)
        assert r.time_emb_proj.weight.shape == (cout, temb)
        assert (r.conv_shortcut is None) == (cin == cout)

    def transformer(t, c_, i):
        assert len(t.transformer_blocks) == tlayers[i]
        assert isinstance(t.proj_in, Linear if linear else Conv2d)
        for b in t.transformer_blocks:
            assert b.attn1.heads == b.attn2.heads == heads[i]
            assert b.attn2.to_q.weight.shape == (c_, c_)
            assert b.attn2.to_k.weight.shape == b.attn2.to_v.weight.shape == (c_, cross)
            assert b.attn1.to_k.weight.shape == (c_, cross if only_cross[i] else c_)
            assert b.only_cross_attention == only_cross[i]
            assert b.ff.net[0].proj.weight.shape == (2 * 4 * c_, c_)  # GEGLU: value and gate

    conv(unet.conv_in, cfg["in_channels"], ch[0], 3)
    assert unet.time_embedding.linear_1.weight.shape == (temb, ch[0])
    if cfg.get("addition_embed_type") == "text_time":
        assert unet.add_embedding.linear_1.weight.shape == (
            temb, cfg["projection_class_embeddings_input_dim"])
        assert unet.add_embedding.linear_2.weight.shape == (temb, temb)
    else:
        assert unet.add_embedding is None
    assert len(unet.down_blocks) == len(unet.up_blocks) == n
    cin = ch[0]
    for i, (block, kind) in enumerate(zip(unet.down_blocks, cfg["down_block_types"])):
        assert len(block.resnets) == layers
        assert len(block.attentions) == (layers if kind.startswith("CrossAttn") else 0)
        for j, r in enumerate(block.resnets):
            resnet(r, cin if j == 0 else ch[i], ch[i])
        for t in block.attentions:
            transformer(t, ch[i], i)
        assert (block.downsamplers is None) == (i == n - 1)
        cin = ch[i]
    assert len(unet.mid_block.resnets) == 2 and len(unet.mid_block.attentions) == 1
    transformer(unet.mid_block.attentions[0], ch[-1], n - 1)
    rev = ch[::-1]
    for i, (block, kind) in enumerate(zip(unet.up_blocks, cfg["up_block_types"])):
        assert len(block.resnets) == layers + 1
        assert len(block.attentions) == (layers + 1 if kind.startswith("CrossAttn") else 0)
        for t in block.attentions:
            transformer(t, rev[i], n - 1 - i)
        assert block.resnets[0].conv1.weight.shape[3] == rev[i]
        assert (block.upsamplers is None) == (i == n - 1)
    conv(unet.conv_out, ch[0], cfg["out_channels"], 3)

    def shapes(tree):
        return [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]  # arrays or their shapes

    # The tree (static fields included) is a function of the config alone.
    fresh = eqx.filter_eval_shape(UNet2DConditionModel, c, key=jax.random.key(5))
    assert jax.tree.structure(fresh) == jax.tree.structure(unet)
    assert shapes(fresh) == shapes(unet)
    other = eqx.filter_eval_shape(
        UNet2DConditionModel, dataclasses.replace(c, upcast_attention=not c.upcast_attention),
        key=jax.random.key(5))
    assert jax.tree.structure(other) != jax.tree.structure(unet)
    wider = eqx.filter_eval_shape(
        UNet2DConditionModel,
        dataclasses.replace(c, block_out_channels=tuple(2 * x for x in c.block_out_channels)),
        key=jax.random.key(5))
    assert shapes(wider) != shapes(unet)
