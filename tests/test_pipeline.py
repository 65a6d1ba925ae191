"""`load_pipeline` / `load_adapter` on a complete tiny diffusers-format model directory."""

import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tiny_pipeline

import codi_eqx
from weights_conversion import WeightsError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("sd") / "model", prediction_type="v_prediction")


def test_load_pipeline_components(model_dir):
    pipe = codi_eqx.load_pipeline(model_dir)
    assert isinstance(pipe.unet, codi_eqx.UNet2DConditionModel)
    assert isinstance(pipe.vae, codi_eqx.AutoencoderKL)
    assert isinstance(pipe.text_encoder, codi_eqx.CLIPTextModel)
    assert pipe.prediction_type == "v_prediction"
    assert pipe.scheduler_config["num_train_timesteps"] == 1000
    assert pipe.vae_scale_factor == 8
    ids = pipe.tokenize(["a photo of a cat", ""])
    assert ids.shape == (2, 16) and ids.dtype == jnp.int32
    emb = jax.vmap(pipe.text_encoder)(ids)
    assert emb.shape == (2, 16, 32)
    image = jax.random.uniform(jax.random.key(0), (3, 64, 48), jnp.float32, -1.0, 1.0)
    latents = pipe.vae.encode(image).mean
    assert latents.shape == (4, 8, 6)
    out = pipe.unet(latents, 10, emb[0])
    assert out.shape == latents.shape

    # Each component computes what diffusers' / transformers' own does from the same folder.
    import diffusers
    import torch
    import transformers

    tok = transformers.CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    want_ids = tok(["a photo of a cat", ""], padding="max_length", max_length=16,
                   truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    with torch.no_grad():
        t_ids = torch.from_numpy(want_ids.astype(np.int64))
        want_emb = transformers.CLIPTextModel.from_pretrained(
            model_dir / "text_encoder").eval()(t_ids).last_hidden_state.numpy()
        want_lat = diffusers.AutoencoderKL.from_pretrained(model_dir / "vae").eval().encode(
            torch.from_numpy(np.asarray(image))[None]).latent_dist.mean[0].numpy()
        want_out = diffusers.UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()(
            torch.from_numpy(want_lat)[None], 10, torch.from_numpy(want_emb[:1])).sample[0].numpy()
    for name, ours, theirs in [("text_encoder", emb, want_emb), ("vae", latents, want_lat),
                               ("unet", out, want_out)]:
        err = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
        assert err <= 1e-4, (name, err)


def test_load_pipeline_bf16(model_dir):
    pipe = codi_eqx.load_pipeline(model_dir, dtype=jnp.bfloat16)
    ref = codi_eqx.load_pipeline(model_dir)
    for name in ("unet", "vae", "text_encoder"):
        ours, fp32 = getattr(pipe, name), getattr(ref, name)
        floats = jax.tree.leaves(eqx.filter(ours, eqx.is_inexact_array))
        assert floats and {a.dtype for a in floats} == {jnp.dtype(jnp.bfloat16)}, name
        # The fp32 weights rounded to bf16, nothing else changed (token ids etc. included).
        want = jax.tree.map(
            lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, fp32)
        assert bool(eqx.tree_equal(ours, want)), name


def test_load_adapter_and_save(model_dir, tmp_path):
    pipe = codi_eqx.load_pipeline(model_dir)
    adapter = codi_eqx.ControlNetModel.from_unet(pipe.unet, key=jax.random.key(0))
    codi_eqx.save_adapter(adapter, tmp_path / "adapter")
    back = codi_eqx.load_adapter(tmp_path / "adapter")
    # The whole tree: structure, static fields (config included), every array bit for bit.
    assert bool(eqx.tree_equal(back, adapter))
    assert back.config == adapter.config


def test_missing_parts_are_named(model_dir, tmp_path):
    with pytest.raises(WeightsError, match="no such model directory"):
        codi_eqx.load_pipeline(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError, match="no vae/ folder"):
        codi_eqx.load_pipeline(broken)
    with pytest.raises(WeightsError, match="Hugging Face cache"):
        codi_eqx.load_pipeline("nobody/no-such-model")
    with pytest.raises(WeightsError, match="not found"):
        codi_eqx.load_adapter(tmp_path / "no-adapter")
