"""SDXL through the whole pipeline, on a tiny random SDXL-like model built with diffusers:
loading (two text encoders and tokenizers), the text conditioning against diffusers'
`StableDiffusionXLPipeline.encode_prompt`, the UNet on it, and sampling against diffusers'
pipeline."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import make_tiny_sdxl_pipeline

from codi_eqx import load_pipeline
from codi_eqx.models import SDXLTextEncoders, sdxl_time_ids, unet_text_inputs, with_time_ids

PROMPTS = ["a red circle", "two blue squares on green"]


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    import diffusers

    folder = make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "model")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return folder, ref


def _encode(pipe, prompts):
    ids = pipe.tokenize(prompts)
    return eqx.filter_jit(jax.vmap(pipe.text_encoders))(ids)


def test_loads_both_encoders(sdxl):
    folder, _ = sdxl
    pipe = load_pipeline(folder)
    assert pipe.is_sdxl and pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert isinstance(pipe.text_encoders, SDXLTextEncoders)
    assert pipe.tokenize(PROMPTS).shape == (2, 2, 16)
    assert pipe.vae.scaling_factor == pytest.approx(0.13025)
    assert pipe.default_resolution == 64  # sample_size 8 x the VAE's 8


def test_text_conditioning_matches_diffusers(sdxl):
    """Hidden states (both encoders' penultimate layers, concatenated) and the pooled
    projection, as diffusers' `encode_prompt`; the empty negative prompt's are zeros
    (`force_zeros_for_empty_prompt`), as diffusers' unconditional embedding."""
    folder, ref = sdxl
    pipe = load_pipeline(folder)
    with torch.no_grad():
        pe, npe, pooled, npooled = ref.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    ours = _encode(pipe, PROMPTS)
    err = max(_rel(ours["encoder_hidden_states"], pe.numpy()),
              _rel(ours["text_embeds"], pooled.numpy()))
    print(f"\n[parity] SDXL text conditioning fp32: {err:.2e}")
    assert err <= 1e-4
    empty = _encode(pipe, ["", ""])
    assert not np.any(np.asarray(empty["encoder_hidden_states"]))
    assert not np.any(np.asarray(empty["text_embeds"]))
    assert not npe.numpy().any() and not npooled.numpy().any()


def test_unet_on_the_pipeline_conditioning(sdxl):
    """The UNet's output on our encoding and time ids equals diffusers' UNet on diffusers'
    encoding and time ids (as its pipeline builds them for a 64x64 image)."""
    folder, ref = sdxl
    pipe = load_pipeline(folder)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 250])
    with torch.no_grad():
        pe, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
        time_ids = ref._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                         text_encoder_projection_dim=24)
        theirs = ref.unet(torch.from_numpy(z), torch.from_numpy(t), pe,
                          added_cond_kwargs={"text_embeds": pooled,
                                             "time_ids": time_ids.repeat(2, 1)}).sample.numpy()
    ids = sdxl_time_ids((64, 64), (0, 0), (64, 64))
    assert ids == tuple(float(v) for v in time_ids[0])
    text = with_time_ids(_encode(pipe, PROMPTS), jnp.broadcast_to(jnp.asarray(ids), (2, 6)))

    def one(zi, ti, te):
        context, added = unet_text_inputs(te)
        return pipe.unet(zi, ti, context, added_cond_kwargs=added)

    ours = eqx.filter_jit(jax.vmap(one))(jnp.asarray(z), jnp.asarray(t, jnp.int32), text)
    err = _rel(ours, theirs)
    print(f"\n[parity] SDXL UNet on the pipeline's conditioning fp32: {err:.2e}")
    assert err <= 1e-4


def test_ddim_sampling_matches_diffusers(sdxl):
    """`generate` with the teacher's DDIM and guidance against diffusers'
    StableDiffusionXLPipeline with its DDIMScheduler, from the same initial noise."""
    import diffusers

    from codi_eqx.sampling import generate

    folder, ref = sdxl
    pipe = load_pipeline(folder)
    ours = generate(pipe, None, PROMPTS[:1], sampler="ddim", steps=4, guidance_scale=3.0,
                    seed=0, height=64, width=64)
    z0 = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (4, 8, 8), jnp.float32)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    with torch.no_grad():
        theirs = ref(PROMPTS[:1], num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                     latents=torch.from_numpy(np.asarray(z0))[None], output_type="np").images
    theirs = np.round(np.clip(theirs, 0, 1) * 255)
    diff = np.abs(ours.astype(np.float64) - theirs)
    print(f"\n[parity] SDXL DDIM 4 steps: max |ours - theirs| = {diff.max():.0f} / 255")
    assert ours.shape == (1, 64, 64, 3)
    assert diff.max() <= 2


# ------------------------------------------------------------------ training and sampling


@pytest.fixture(scope="module")
def sdxl_run(sdxl, tmp_path_factory):
    """`codi train` for 4 steps on the tiny SDXL model and a seed-layout dataset (edge
    condition images), then `codi sample` with its adapter."""
    from helpers import base, invoke, make_seed_folder, why

    folder, _ = sdxl
    root = tmp_path_factory.mktemp("sdxl-train")
    data = make_seed_folder(root / "data", n=8)
    result = invoke(*base(folder, data, root / "run"), "--proportion_empty_prompts", "0.5")
    assert result.exit_code == 0, why(result)
    return folder, data, root


@pytest.mark.slow
def test_codi_train_on_sdxl(sdxl_run):
    from helpers import rows

    folder, _, root = sdxl_run
    out = root / "run"
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    history = rows(out)
    assert len(history) == 4 and all(np.isfinite(r["loss"]) for r in history)
    config = json.loads((out / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time"
    assert config["projection_class_embeddings_input_dim"] == 24 + 6 * 8


@pytest.mark.slow
def test_codi_sample_on_sdxl(sdxl_run, tmp_path):
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    from cli.sample import sample

    folder, data, root = sdxl_run
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("sample")(sample)
    app.command("other")(lambda: None)
    edges = sorted((data / "processed_images").iterdir())[0]
    result = CliRunner().invoke(app, [
        "sample", "--model", str(folder), "--adapter", str(root / "run"), "--prompt", "a cat",
        "--control_image", str(edges), "--resolution", "32", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "x.png")
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0


@pytest.mark.slow
def test_sdxl_latent_cache_run(sdxl_run):
    """With `--cache_latents`, both text embeddings are cached per caption (one .npz each)
    and the run trains."""
    from helpers import base, invoke, rows, why

    folder, data, root = sdxl_run
    out = root / "cached"
    result = invoke(*base(folder, data, out), "--cache_latents", root / "cache")
    assert result.exit_code == 0, why(result)
    texts = list((root / "cache" / "text").rglob("*.npz"))
    assert texts
    with np.load(texts[0]) as z:
        assert set(z.files) == {"text_embeddings", "pooled_text_embeddings"}
        assert z["text_embeddings"].shape == (16, 40) and z["pooled_text_embeddings"].shape == (24,)
    assert all(np.isfinite(r["loss"]) for r in rows(out))


@pytest.mark.slow
def test_sdxl_interrupt_and_resume_is_exact(sdxl_run):
    """The SDXL run interrupted after step 2 (Ctrl-C) and resumed from its checkpoint ends
    where the uninterrupted run ended: the same losses and the same adapter, bit for bit (the
    empty-prompt draws, the crop corners and the time ids included)."""
    import signal

    import jax

    from helpers import base, invoke, library_run, rows, signal_after, why
    from weights_conversion import load_adapter

    folder, data, root = sdxl_run
    out = root / "resumed"
    stopped = library_run(folder, data, out, signal_after(2, signal.SIGINT),
                          proportion_empty_prompts=0.5)
    assert stopped["interrupted"] == signal.SIGINT and stopped["step"] == 2, stopped
    result = invoke(*base(folder, data, out, "--proportion_empty_prompts", "0.5",
                          "--resume_from_checkpoint", "latest"))
    assert result.exit_code == 0, why(result)
    for x, y in zip(jax.tree.leaves(load_adapter(root / "run")), jax.tree.leaves(load_adapter(out)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    keys = ("loss", "loss_consistency", "loss_regularizer", "grad_norm")
    assert [[r[k] for k in keys] for r in rows(out)] == [[r[k] for k in keys] for r in rows(root / "run")]


@pytest.mark.slow
def test_sdxl_devices_match_one_device(sdxl):
    """The SDXL step (pooled embeddings and time ids in the batch) on 4 simulated devices
    gives the single device's losses and parameters."""
    import math

    from helpers import run_train_steps

    from codi_eqx import distill
    from codi_eqx.models import ControlNetModel

    folder, _ = sdxl
    pipe = load_pipeline(folder)
    adapter = ControlNetModel.from_unet(pipe.unet, conditioning_channels=3, key=jax.random.key(1))
    adapter = jax.tree.map(
        lambda a: a + 0.02 * jax.random.normal(jax.random.key(5), a.shape, a.dtype)
        if eqx.is_inexact_array(a) else a, adapter)
    null = eqx.filter_jit(pipe.text_encoders)(pipe.tokenize([""])[0])
    frozen = distill.make_frozen(pipe.unet, None, None, pipe.schedule, null_embedding=null)
    params = distill.Trainable(adapter)

    def batch(seed):
        r = np.random.default_rng(seed)
        return {
            "latent_mean": r.standard_normal((4, 4, 4, 4)).astype(np.float32),
            "latent_logvar": r.uniform(-4, -1, (4, 4, 4, 4)).astype(np.float32),
            "scaling_factor": np.full((4,), 0.13025, np.float32),
            "text_embeddings": r.standard_normal((4, 16, 40)).astype(np.float32),
            "pooled_text_embeddings": r.standard_normal((4, 24)).astype(np.float32),
            "time_ids": np.tile(np.array([40, 32, 4, 0, 32, 32], np.float32), (4, 1)),
            "conditioning_pixel_values": r.uniform(0, 1, (4, 3, 32, 32)).astype(np.float32),
        }

    batches = [batch(0), batch(1)]
    cfg = distill.DistillConfig()
    ref_state, ref, _ = run_train_steps(frozen, params, cfg, devices=1, batches=batches)
    state, hist, _ = run_train_steps(frozen, params, cfg, devices=4, batches=batches)
    for a, b in zip(hist, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(eqx.filter(state.params, eqx.is_inexact_array))]
    q = [np.asarray(x, np.float64) for x in jax.tree.leaves(eqx.filter(ref_state.params, eqx.is_inexact_array))]
    diff = math.sqrt(sum(float(np.sum(np.square(x - y))) for x, y in zip(p, q)))
    norm = math.sqrt(sum(float(np.sum(np.square(y))) for y in q))
    print(f"\n[parallel] SDXL 4 devices vs 1: loss {hist[-1]['loss']:.6e} vs {ref[-1]['loss']:.6e}, "
          f"relative parameter difference {diff / norm:.2e}")
    # Measured 1.02e-5 with XLA:CPU's Eigen convolutions (codi_eqx/_xla_flags.py), whose
    # per-device batch of 1 sums in another order than the single device's batch of 4.
    assert diff / norm <= 3e-5


# ------------------------------------------------------------------ adapters in diffusers


@pytest.mark.parametrize("conditioning", [3, None], ids=["cond", "nocond"])
def test_sdxl_adapter_exports_to_diffusers(sdxl, conditioning, tmp_path):
    """An SDXL adapter (added embedding included), written with `codi convert-weights --to
    diffusers`, loads in diffusers' ControlNetModel with matching residuals, and converts
    back to the same adapter."""
    import typer
    from helpers import diffusers_controlnet_error
    from typer.testing import CliRunner

    from cli.convert import convert_weights
    from codi_eqx.models import ControlNetModel
    from weights_conversion import load_adapter, save_adapter

    folder, _ = sdxl
    pipe = load_pipeline(folder)
    adapter = ControlNetModel.from_unet(pipe.unet, conditioning_channels=conditioning,
                                        key=jax.random.key(3))
    adapter = jax.tree.map(  # the zero convolutions random too, so the residuals are not 0
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(4), a.shape, a.dtype)
        if eqx.is_inexact_array(a) else a, adapter)
    assert adapter.add_embedding is not None
    save_adapter(adapter, tmp_path / "adapter")
    app = typer.Typer()
    app.command("convert-weights")(convert_weights)
    app.command("other")(lambda: None)
    out = tmp_path / "controlnet"
    result = CliRunner().invoke(app, ["convert-weights", str(tmp_path / "adapter"), str(out),
                                      "--to", "diffusers"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time"
    error = diffusers_controlnet_error(adapter, out)
    print(f"\n[parity] SDXL ControlNet ({'with' if conditioning else 'without'} a condition "
          f"image) exported, in diffusers: max relative error {error:.1e}")
    assert error <= 1e-4
    if conditioning is None:  # diffusers' format always has a condition embedding
        return
    back = tmp_path / "back"
    result = CliRunner().invoke(app, ["convert-weights", str(out), str(back)])
    assert result.exit_code == 0, result.output
    again = load_adapter(back)
    for a, b in zip(jax.tree.leaves(eqx.filter(again, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(adapter, eqx.is_array))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sdxl_controlnet_from_a_diffusers_folder(sdxl, tmp_path):
    """A ControlNet that diffusers builds from the SDXL UNet (`ControlNetModel.from_unet`)
    loads as an adapter with the same residuals."""
    import diffusers
    import torch
    from helpers import diffusers_controlnet_error

    from weights_conversion import load_adapter

    folder, _ = sdxl
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    cn = diffusers.ControlNetModel.from_unet(unet)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in cn.parameters():  # the zero convolutions random, so the residuals are not 0
            p.add_(0.05 * torch.randn_like(p))
    cn.save_pretrained(tmp_path / "cn")
    adapter = load_adapter(tmp_path / "cn")
    assert adapter.add_embedding is not None
    error = diffusers_controlnet_error(adapter, tmp_path / "cn")
    print(f"\n[parity] SDXL ControlNet from diffusers: max relative error {error:.1e}")
    assert error <= 1e-4


def test_training_resolution_defaults_to_the_models_size(sdxl, tmp_path):
    """Without --resolution, SDXL models train at their UNet's own size (1024 for SDXL base),
    SD 1.x / 2.x at 512; a given resolution is kept."""
    from codi_eqx.train import TrainConfig, with_model_defaults

    def resolution(folder, **given):
        config = TrainConfig(pretrained_model_name_or_path=str(folder), **given)
        return with_model_defaults(config).resolution

    folder, _ = sdxl
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert resolution(folder) == unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert resolution(folder, resolution=48) == 48
    for name, unet_config in [("xl", {"addition_embed_type": "text_time", "sample_size": 128}),
                              ("sd", {"sample_size": 96})]:
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "vae").mkdir()
        (tmp_path / name / "unet" / "config.json").write_text(json.dumps(unet_config))
        (tmp_path / name / "vae" / "config.json").write_text(
            json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert resolution(tmp_path / "xl") == 1024
    assert resolution(tmp_path / "sd") == 512
