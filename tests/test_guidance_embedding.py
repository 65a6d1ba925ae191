"""The guidance-conditioned adapter: a zero-initialised guidance embedding leaves the adapter
unchanged; diffusers' ControlNet (`class_embed_type="timestep"`, fed `guidance_label(w)`)
loads it and gives its residuals; folding the embedding at a fixed w gives a plain adapter
that computes what the conditioned one computes at w."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from helpers import SD1_UNET, make_unet, perturb

from codi_eqx.models import ControlNetModel, guidance_label
from weights_conversion import load_adapter, load_unet, save_adapter

H = W = 8


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "unet"
    make_unet(SD1_UNET, seed=1).save_pretrained(folder, safe_serialization=True)
    return load_unet(folder)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, H, W)).astype(np.float32), np.array([10, 731], np.int64),
            rng.standard_normal((2, 7, SD1_UNET["cross_attention_dim"])).astype(np.float32),
            rng.random((2, 3, 8 * H, 8 * W)).astype(np.float32))


def _ours(adapter, sample, t, ehs, cond, labels):
    def one(x, ti, e, c, lab):
        return adapter(x, ti, e, c, class_labels=lab)

    return eqx.filter_jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None if labels is None else 0)))(
        jnp.asarray(sample), jnp.asarray(t, jnp.int32), jnp.asarray(ehs), jnp.asarray(cond),
        None if labels is None else jnp.asarray(labels))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_fresh_guidance_embedding_changes_nothing(unet):
    plain = perturb(ControlNetModel.from_unet(unet, key=jax.random.key(0)), jax.random.key(1))
    conditioned = plain.with_guidance_embedding(key=jax.random.key(2))
    assert conditioned.guidance_conditioned and not plain.guidance_conditioned
    assert conditioned.config.class_embed_type == "timestep"
    sample, t, ehs, cond = _inputs()
    d0, m0 = _ours(plain, sample, t, ehs, cond, None)
    for w in (1.0, 4.0):
        labels = np.full((2,), float(guidance_label(w)), np.float32)
        d1, m1 = _ours(conditioned, sample, t, ehs, cond, labels)
        # the embedding adds exact zeros; the two programs compile apart (float reordering)
        assert max([_rel(a, b) for a, b in zip(d1, d0)] + [_rel(m1, m0)]) <= 1e-6
    with pytest.raises(ValueError, match="class_labels"):
        _ours(conditioned, sample, t, ehs, cond, None)
    with pytest.raises(ValueError, match="no guidance embedding"):
        _ours(plain, sample, t, ehs, cond, np.zeros(2, np.float32))


def test_conditioned_adapter_loads_in_diffusers_and_matches(unet, tmp_path):
    adapter = ControlNetModel.from_unet(unet, key=jax.random.key(0))
    adapter = perturb(adapter.with_guidance_embedding(key=jax.random.key(2)), jax.random.key(3))
    save_adapter(adapter, tmp_path / "a")
    assert eqx.tree_equal(load_adapter(tmp_path / "a"), adapter)
    tcn = TorchControlNet.from_pretrained(tmp_path / "a").eval()
    assert tcn.config.class_embed_type == "timestep"
    sample, t, ehs, cond = _inputs(1)
    labels = np.array([float(guidance_label(3.0)), float(guidance_label(5.5))], np.float32)
    with torch.no_grad():
        down, mid = tcn(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
                        controlnet_cond=torch.from_numpy(cond),
                        class_labels=torch.from_numpy(labels), return_dict=False)
    d_ours, m_ours = _ours(adapter, sample, t, ehs, cond, labels)
    errs = [_rel(a, b.numpy()) for a, b in zip(d_ours, down)] + [_rel(m_ours, mid.numpy())]
    assert max(errs) <= 1e-4, errs
    # The labels matter: another w gives other residuals.
    d_other, _ = _ours(adapter, sample, t, ehs, cond, labels + 100.0)
    assert _rel(d_other[-1], down[-1].numpy()) > 1e-3


def test_folded_adapter_is_the_conditioned_one_at_w(unet, tmp_path):
    adapter = ControlNetModel.from_unet(unet, key=jax.random.key(0))
    adapter = perturb(adapter.with_guidance_embedding(key=jax.random.key(2)), jax.random.key(3))
    folded = adapter.fold_guidance_embedding(3.5)
    assert not folded.guidance_conditioned and folded.config.class_embed_type is None
    sample, t, ehs, cond = _inputs(2)
    labels = np.full((2,), float(guidance_label(3.5)), np.float32)
    d_c, m_c = _ours(adapter, sample, t, ehs, cond, labels)
    d_f, m_f = _ours(folded, sample, t, ehs, cond, None)
    assert max([_rel(a, b) for a, b in zip(d_f, d_c)] + [_rel(m_f, m_c)]) <= 1e-5
    # and diffusers' standard ControlNet (no class labels) reads the folded export
    save_adapter(folded, tmp_path / "f")
    tcn = TorchControlNet.from_pretrained(tmp_path / "f").eval()
    assert tcn.class_embedding is None
    with torch.no_grad():
        down, mid = tcn(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
                        controlnet_cond=torch.from_numpy(cond), return_dict=False)
    errs = [_rel(a, b.numpy()) for a, b in zip(d_c, down)] + [_rel(m_c, mid.numpy())]
    assert max(errs) <= 1e-4, errs
