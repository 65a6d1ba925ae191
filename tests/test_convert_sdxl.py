"""`codi convert-weights` on SDXL: original single-file checkpoints (`conditioner.embedders.0/1`,
`label_emb`) and SDXL ControlNet single files (diffusers' names and the original
`control_model.*` layout), on tiny random models, checked exactly against the tiny diffusers
folders and against diffusers' own single-file reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from test_convert import error_line, no_leftovers, randomized, run, same

from codi_eqx import load_pipeline
from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from weights_conversion import (
    SafetensorsFile,
    load_adapter,
    load_text_encoder,
    load_unet,
    load_vae,
    save_adapter,
    save_file,
)
from weights_conversion import single_file as sf

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder,
           "text_encoder_2": load_text_encoder}


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> Path:
    from helpers import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("xl") / "model")


@pytest.fixture(scope="module")
def xl_models(xl) -> dict:
    return {part: LOADERS[part](xl / part) for part in PARTS}


def _original(models: dict) -> dict[str, np.ndarray]:
    return sf.pipeline_to_original(models["unet"], models["vae"], models["text_encoder"], "sdxl",
                                   text_encoder_2=models["text_encoder_2"])


@pytest.fixture(scope="module")
def xl_file(xl_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xl_single") / "sd_xl_tiny.safetensors"
    save_file(_original(xl_models), path)
    return path


def _state_equal(got, ref) -> None:
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    import torch

    assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a)


# ------------------------------------------------------------------------------------------
# Whole models


def test_sdxl_original_layout(xl_file):
    """The writer's layout is Stability's: both text towers at their prefixes, the added
    embedding as `label_emb`, OpenCLIP's fused attention and (hidden, projection) matrix."""
    f = SafetensorsFile(xl_file)
    assert sf.detect_family(f) == "sdxl"
    u = sf.UNET_PREFIX
    assert {f"{u}label_emb.0.0.weight", f"{u}label_emb.0.2.bias"} <= set(f)
    assert not [k for k in f if "add_embedding" in k]
    g = sf.SDXL_OPENCLIP_PREFIX
    assert f.shape(g + "text_projection") == (24, 24)
    assert f.shape(g + "transformer.resblocks.0.attn.in_proj_weight") == (72, 24)
    assert f.shape(g + "positional_embedding") == (16, 24)
    assert sf.SDXL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight" in f
    # The second down block of the tiny UNet has two transformer layers.
    assert f"{u}input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in f
    assert f"{u}input_blocks.3.1.transformer_blocks.2.attn2.to_k.weight" not in f


def test_sdxl_single_file_with_config(xl, xl_models, xl_file, tmp_path):
    out = tmp_path / "out"
    result = run(xl_file, out, "--config", xl)
    assert result.exit_code == 0, result.output
    assert "no tokenizer" not in result.output
    p = load_pipeline(out)
    assert p.is_sdxl and p.tokenizer_2 is not None
    for part in PARTS:
        assert same(getattr(p, part), xl_models[part]), part
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((out / "codi_eqx.json").read_text())["components"] == [
        *PARTS, "tokenizer", "tokenizer_2", "scheduler"]
    # diffusers reads the plain export as an SDXL pipeline with the folder's tensors.
    import diffusers

    plain = tmp_path / "plain"
    assert run(xl_file, plain, "--config", xl, "--to", "diffusers").exit_code == 0
    got = diffusers.StableDiffusionXLPipeline.from_pretrained(plain)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(xl)
    for part in PARTS:
        _state_equal(getattr(got, part), getattr(ref, part))
    assert no_leftovers(tmp_path)


def test_sdxl_single_file_matches_diffusers_reader(xl, xl_file):
    """The independent reference: diffusers' own single-file loader (offline, with the local
    configs) reads the writer's file into exactly the tiny folder's tensors."""
    import diffusers
    import transformers

    path = str(xl_file)
    unet = diffusers.UNet2DConditionModel.from_single_file(
        path, config=str(xl), subfolder="unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_single_file(
        path, config=str(xl), subfolder="vae", local_files_only=True)
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        path, config=str(xl), local_files_only=True)
    _state_equal(unet, diffusers.UNet2DConditionModel.from_pretrained(xl / "unet"))
    _state_equal(vae, diffusers.AutoencoderKL.from_pretrained(xl / "vae"))
    _state_equal(pipe.text_encoder, transformers.CLIPTextModel.from_pretrained(xl / "text_encoder"))
    _state_equal(pipe.text_encoder_2,
                 transformers.CLIPTextModelWithProjection.from_pretrained(xl / "text_encoder_2"))


def test_sdxl_diffusers_dir(xl, xl_models, tmp_path):
    """An SDXL diffusers directory converts with both text encoders and tokenizers."""
    out = tmp_path / "own"
    assert run(xl, out).exit_code == 0
    p = load_pipeline(out)
    assert p.is_sdxl and p.force_zeros_for_empty_prompt
    for part in PARTS:
        assert same(getattr(p, part), xl_models[part]), part


def _random(build, seed: int):
    return randomized(eqx.filter_eval_shape(build), seed)


def _sdxl_conventions() -> dict:
    """Small models that follow SDXL's conventions (32 norm groups, 64-channel heads, linear
    projections, no attention in the first block, deeper transformers further down, time ids
    in 256 channels), so that their configs can be inferred from the weights alone."""
    unet_cfg = UNet2DConditionConfig.from_dict(dict(
        block_out_channels=[64, 128], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
        attention_head_dim=[1, 2], transformer_layers_per_block=[1, 2], cross_attention_dim=192,
        use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=64 + 6 * 256,
    ))
    vae_cfg = AutoencoderKLConfig.from_dict(dict(
        block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=32,
        scaling_factor=0.13025))
    text = dict(vocab_size=100, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=8)
    text_1 = CLIPTextConfig(hidden_size=64, num_attention_heads=1, hidden_act="quick_gelu", **text)
    text_2 = CLIPTextConfig(hidden_size=128, num_attention_heads=2, hidden_act="gelu",
                            projection_dim=64, **text)
    key = jax.random.key(5)
    return {
        "unet": _random(lambda: UNet2DConditionModel(unet_cfg, key=key), 6),
        "vae": _random(lambda: AutoencoderKL(vae_cfg, key=key), 7),
        "text_encoder": _random(lambda: CLIPTextModel(text_1, key=key), 8),
        "text_encoder_2": _random(lambda: CLIPTextModelWithProjection(text_2, key=key), 9),
    }


def test_sdxl_single_file_inferred_config(tmp_path):
    models = _sdxl_conventions()
    src = tmp_path / "model.safetensors"
    save_file(_original(models), src)
    out = tmp_path / "out"
    result = run(src, out)
    assert result.exit_code == 0, result.output
    assert "no tokenizer/, tokenizer_2/" in " ".join(result.output.split())
    for part in PARTS:
        assert same(LOADERS[part](out / part), models[part]), part
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert (unet["addition_embed_type"], unet["addition_time_embed_dim"]) == ("text_time", 256)
    assert unet["transformer_layers_per_block"] == [1, 2]
    assert unet["projection_class_embeddings_input_dim"] == 64 + 6 * 256
    assert unet["cross_attention_dim"] == 192 and unet["attention_head_dim"] == [1, 2]
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
    text_2 = json.loads((out / "text_encoder_2" / "config.json").read_text())
    assert text_2["architectures"] == ["CLIPTextModelWithProjection"]
    assert (text_2["hidden_act"], text_2["projection_dim"], text_2["num_hidden_layers"]) == ("gelu", 64, 2)
    assert json.loads((out / "text_encoder" / "config.json").read_text())["hidden_act"] == "quick_gelu"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("case,message", [
    ("refiner", "SDXL refiner"),
    ("missing_projection", "missing tensor(s): conditioner.embedders.1.model.text_projection"),
    ("extra_tensor", "unexpected tensor(s): conditioner.embedders.1.model.extra"),
])
def test_sdxl_failures(case, message, xl, xl_file, tmp_path):
    tensors = dict(SafetensorsFile(xl_file))
    g = sf.SDXL_OPENCLIP_PREFIX
    if case == "refiner":  # one OpenCLIP tower at embedders.0 and nothing at embedders.1
        tensors = {k.replace(g, "conditioner.embedders.0.model."): v for k, v in tensors.items()
                   if not k.startswith(sf.SDXL_CLIP_PREFIX)}
    elif case == "missing_projection":
        tensors.pop(g + "text_projection")
    else:
        tensors[g + "extra"] = np.zeros(2, np.float32)
    src = tmp_path / "bad.safetensors"
    save_file(tensors, src)
    out = tmp_path / "out"
    result = run(src, out, "--config", xl)
    assert result.exit_code == 1, result.output
    assert message in error_line(result)
    assert not out.exists() and no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------
# SDXL ControlNets as single files


def _diffusers_file(adapter, tmp_path: Path) -> tuple[Path, Path]:
    """The adapter as a diffusers ControlNet folder and its weights file on its own (a
    diffusers-names single file)."""
    save_adapter(adapter, tmp_path / "adapter")
    folder = tmp_path / "cn"
    assert run(tmp_path / "adapter", folder, "--to", "diffusers").exit_code == 0
    single = tmp_path / "controlnet_xl.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    return folder, single


def test_sdxl_controlnet_single_files(xl_models, tmp_path):
    import diffusers

    adapter = randomized(ControlNetModel.from_unet(xl_models["unet"], key=jax.random.key(1)), 3)
    folder, single = _diffusers_file(adapter, tmp_path)
    assert sf.detect_family(SafetensorsFile(single)) == "controlnet"
    ref = diffusers.ControlNetModel.from_pretrained(folder)
    # diffusers' names: diffusers' reader and ours give the folder's tensors.
    got = diffusers.ControlNetModel.from_single_file(str(single), config=str(folder),
                                                     local_files_only=True)
    _state_equal(got, ref)
    out = tmp_path / "from_diffusers_names"
    result = run(single, out, "--config", folder)
    assert result.exit_code == 0, result.output
    assert same(load_adapter(out), adapter)
    # The original layout, with the added embedding as `label_emb`: read back from the
    # metadata's config, and from the folder's without metadata.
    original = tmp_path / "control_xl.safetensors"
    assert run(tmp_path / "adapter", original, "--to", "original").exit_code == 0
    assert "control_model.label_emb.0.0.weight" in SafetensorsFile(original)
    bare = tmp_path / "bare.safetensors"
    save_file(dict(SafetensorsFile(original)), bare)
    for src, extra in ((original, ()), (bare, ("--config", folder))):
        out = tmp_path / f"from_{src.stem}"
        result = run(src, out, *extra)
        assert result.exit_code == 0, result.output
        assert same(load_adapter(out), adapter)
    # diffusers' reader of the original ControlNet layout leaves `label_emb` out (its table
    # has no added embedding for ControlNets): everything else matches.
    got = diffusers.ControlNetModel.from_single_file(str(bare), config=str(folder),
                                                     local_files_only=True).state_dict()
    rest = {k: v for k, v in ref.state_dict().items() if not k.startswith("add_embedding.")}
    assert all(np.array_equal(got[k].numpy(), v.numpy()) for k, v in rest.items())


@pytest.mark.parametrize("cond", [True, False])
def test_sdxl_controlnet_inferred_config(cond, tmp_path):
    """An SDXL-conventions ControlNet without any config: read off the shapes, in diffusers'
    names and in the original layout."""
    unet = _sdxl_conventions()["unet"]
    adapter = randomized(ControlNetModel.from_unet(
        unet, conditioning_channels=3 if cond else None,
        conditioning_embedding_out_channels=(8, 16), vae_scale_factor=2, key=jax.random.key(9)), 10)
    src = tmp_path / "diffusers_names.safetensors"
    save_adapter(adapter, tmp_path / "adapter")
    shutil.copy(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors", src)
    original = tmp_path / "control_xl.safetensors"
    save_file(sf.controlnet_to_original(adapter), original)
    for path in (src, original):
        out = tmp_path / f"out_{path.stem}"
        result = run(path, out)
        assert result.exit_code == 0, result.output
        got = load_adapter(out)
        assert got.config.unet.addition_time_embed_dim == 256
        if cond or path == src:
            assert same(got, adapter)
        else:  # the original layout always has a condition encoder: all zero here
            assert same(got, sf.with_zero_condition_encoder(adapter))
