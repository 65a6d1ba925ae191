"""`codi convert-weights`: every kind of SOURCE on tiny random models, the exports read back by
diffusers, and every failure mode (one-line error, exit code, no partial output)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cli.convert import convert_weights
from codi_eqx import load_pipeline
from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from codi_eqx.nn import Conv2d
from weights_conversion import (
    SafetensorsFile,
    WeightsError,
    load_adapter,
    load_text_encoder,
    load_unet,
    load_vae,
    module_keys,
    save_adapter,
    save_file,
    to_checkpoint_layout,
)
from weights_conversion import single_file as sf

app = typer.Typer()
app.command("convert-weights")(convert_weights)


@app.callback()
def _main() -> None:
    pass


def run(*args):
    result = CliRunner().invoke(app, ["convert-weights", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def same(a, b) -> bool:
    ka, kb = module_keys(a), module_keys(b)
    return ka.keys() == kb.keys() and all(
        ka[k].dtype == kb[k].dtype and np.array_equal(np.asarray(ka[k]), np.asarray(kb[k])) for k in ka
    )


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    from helpers import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "model")


@pytest.fixture(scope="module")
def models(pipe):
    return load_unet(pipe / "unet"), load_vae(pipe / "vae"), load_text_encoder(pipe / "text_encoder")


@pytest.fixture(scope="module")
def single_files(pipe, models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single")
    out = {}
    for family in ("sd1", "sd2"):
        out[family] = folder / f"{family}.safetensors"
        save_file(sf.pipeline_to_original(*models, family), out[family])
    return out


def randomized(module, seed: int):
    """Every parameter of `module` (or of an `eqx.filter_eval_shape` template) random."""
    leaves, treedef = jax.tree_util.tree_flatten(
        module, is_leaf=lambda x: x is None or isinstance(x, jax.ShapeDtypeStruct))
    rng = np.random.default_rng(seed)
    leaves = [
        jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
        if eqx.is_inexact_array(x) or isinstance(x, jax.ShapeDtypeStruct) else x
        for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def adapters(models):
    unet = models[0]
    with_cond = ControlNetModel.from_unet(unet, key=jax.random.key(1))
    without = ControlNetModel.from_unet(unet, conditioning_channels=None, key=jax.random.key(2))
    return {"cond": randomized(with_cond, 3), "nocond": randomized(without, 4)}


# ------------------------------------------------------------------------------------------
# Sources


def test_diffusers_dir_to_own_format(pipe, models, tmp_path):
    out = tmp_path / "own"
    result = run(pipe, out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "codi_eqx.json").read_text())
    assert manifest == {"format": "codi-eqx-model", "version": 1, "dtype": "float32",
                        "components": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]}
    for part in ("unet", "vae"):
        assert sorted(p.name for p in (out / part).iterdir()) == [
            "config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(out.rglob("*.bin"))
    p = load_pipeline(out)
    for a, b in zip((p.unet, p.vae, p.text_encoder), models):
        assert same(a, b)
    assert p.tokenize(["a photo of a cat"]).shape == (1, 16)
    assert no_leftovers(tmp_path)


def test_dtype_and_fp16_sharded_source(pipe, tmp_path):
    # An fp16-variant, sharded UNet: the existing loader's cases, read through the command.
    src = tmp_path / "src"
    shutil.copytree(pipe, src)
    unet = src / "unet"
    tensors = dict(SafetensorsFile(unet / "diffusion_pytorch_model.safetensors"))
    names = sorted(tensors)
    half = {k: np.asarray(v, np.float16) for k, v in tensors.items()}
    shards = {"diffusion_pytorch_model-00001-of-00002.fp16.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.fp16.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: half[k] for k in keys}, unet / shard)
    (unet / "diffusion_pytorch_model.fp16.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    out = tmp_path / "bf16"
    result = run(src, out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "codi_eqx.json").read_text())["dtype"] == "bfloat16"
    f = SafetensorsFile(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {f.dtype(k).name for k in f} == {"bfloat16"}
    p = load_pipeline(out)  # the stored dtype by default: no cast
    assert p.unet.conv_in.weight.dtype == jnp.bfloat16
    ref = np.asarray(half["conv_in.weight"], np.float32)
    # The module holds convolution weights channels-last; the file keeps PyTorch's layout.
    got = to_checkpoint_layout(np.asarray(p.unet.conv_in.weight, np.float32),
                               Conv2d.checkpoint_axes["weight"])
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-3)


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_diffusers_output_is_read_by_diffusers(pipe, models, tmp_path):
    """Every component of the `--to diffusers` export, loaded by diffusers / transformers,
    holds the source's tensors and computes what ours computes on the same inputs (fp32
    parity bound 1e-4)."""
    import diffusers
    import torch
    import transformers

    out = tmp_path / "plain"
    assert run(pipe, out, "--to", "diffusers").exit_code == 0
    assert not (out / "codi_eqx.json").exists()
    t_unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").eval()
    a = t_unet.state_dict()
    b = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    unet, vae, text = models
    t_vae = diffusers.AutoencoderKL.from_pretrained(out / "vae").eval()
    t_text = transformers.CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 4, 6)).astype(np.float32)
    ehs = rng.standard_normal((1, 5, unet.config.cross_attention_dim[0])).astype(np.float32)
    t = np.array([321], np.int64)
    ids = rng.integers(0, text.config.vocab_size, (1, 7)).astype(np.int64)
    with torch.no_grad():
        ref_unet = t_unet(torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(ehs)).sample
        ref_vae = t_vae.decode(torch.from_numpy(z)).sample
        ref_text = t_text(torch.from_numpy(ids)).last_hidden_state
    got_unet = eqx.filter_jit(jax.vmap(unet))(
        jnp.asarray(z), jnp.asarray(t, jnp.int32), jnp.asarray(ehs))
    got_vae = eqx.filter_jit(jax.vmap(vae.decode))(jnp.asarray(z))
    got_text = eqx.filter_jit(jax.vmap(text))(jnp.asarray(ids, jnp.int32))
    errs = {
        "unet": _rel(got_unet, ref_unet.numpy()),
        "vae": _rel(got_vae, ref_vae.numpy()),
        "text_encoder": _rel(got_text, ref_text.numpy()),
    }
    assert max(errs.values()) <= 1e-4, errs


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = run("nobody-here/no-such-model", tmp_path / "out")
    assert result.exit_code == 1
    assert "not in the Hugging Face cache" in error_line(result)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_with_config(family, pipe, models, single_files, tmp_path):
    out = tmp_path / family
    result = run(single_files[family], out, "--config", pipe)
    assert result.exit_code == 0, result.output
    p = load_pipeline(out)
    for a, b in zip((p.unet, p.vae, p.text_encoder), models):
        assert same(a, b)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_matches_diffusers_reader(family, pipe, single_files):
    """The independent reference: diffusers' own single-file loader (offline, with the local
    configs) reads the original-layout files into exactly the tiny pipeline's tensors."""
    import diffusers
    import torch
    import transformers

    path = str(single_files[family])
    unet = diffusers.UNet2DConditionModel.from_single_file(
        path, config=str(pipe), subfolder="unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_single_file(
        path, config=str(pipe), subfolder="vae", local_files_only=True)
    refs = [(unet, diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet")),
            (vae, diffusers.AutoencoderKL.from_pretrained(pipe / "vae"))]
    if family == "sd2":  # the OpenCLIP text encoder, fused q/k/v split (SD 1.x's is a rename)
        sd = diffusers.StableDiffusionPipeline.from_single_file(
            path, config=str(pipe), local_files_only=True, safety_checker=None)
        refs.append((sd.text_encoder, transformers.CLIPTextModel.from_pretrained(pipe / "text_encoder")))
    for got, ref in refs:
        a, b = got.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a)


def _sd_conventions(family: str):
    """Small models that follow SD's conventions (32 norm groups, SD 1.x's 8 heads or SD 2.x's
    64-channel heads), so that their configs can be inferred from the weights alone."""
    linear = family == "sd2"
    unet_cfg = dict(
        block_out_channels=[64, 128] if linear else [32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
        attention_head_dim=[1, 2] if linear else 8, cross_attention_dim=64,
        use_linear_projection=linear, norm_num_groups=32,
    )
    vae_cfg = dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=32)
    text_cfg = CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=8,
                              hidden_act="gelu" if linear else "quick_gelu")
    key = jax.random.key(5)
    ucfg, vcfg = UNet2DConditionConfig.from_dict(unet_cfg), AutoencoderKLConfig.from_dict(vae_cfg)
    unet = randomized(eqx.filter_eval_shape(lambda: UNet2DConditionModel(ucfg, key=key)), 6)
    vae = randomized(eqx.filter_eval_shape(lambda: AutoencoderKL(vcfg, key=key)), 7)
    text = randomized(eqx.filter_eval_shape(lambda: CLIPTextModel(text_cfg, key=key)), 8)
    return unet, vae, text


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_inferred_config(family, tmp_path):
    unet, vae, text = _sd_conventions(family)
    src = tmp_path / "model.safetensors"
    save_file(sf.pipeline_to_original(unet, vae, text, family), src)
    out = tmp_path / "out"
    result = run(src, out)
    assert result.exit_code == 0, result.output
    assert "no tokenizer/" in result.output  # the one-line note
    with pytest.raises(WeightsError, match="no tokenizer/"):
        load_pipeline(out)
    assert json.loads((out / "unet" / "config.json").read_text())["use_linear_projection"] == (family == "sd2")
    from weights_conversion import load_text_encoder as lt
    from weights_conversion import load_unet as lu
    from weights_conversion import load_vae as lv

    assert same(lu(out / "unet"), unet)
    assert same(lv(out / "vae"), vae)
    assert same(lt(out / "text_encoder"), text)


def test_pickle_needs_flag(single_files, models, pipe, tmp_path):
    import torch

    tensors = SafetensorsFile(single_files["sd1"])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(tensors[k])) for k in tensors},
                "global_step": 10}, ckpt)
    result = run(ckpt, tmp_path / "out")
    assert result.exit_code == 2
    assert "--allow-pickle" in error_line(result)
    assert not (tmp_path / "out").exists()
    result = run(ckpt, tmp_path / "out", "--allow-pickle", "--config", pipe)
    assert result.exit_code == 0, result.output
    assert same(load_pipeline(tmp_path / "out").unet, models[0])


# ------------------------------------------------------------------------------------------
# Adapters and ControlNets


@pytest.mark.parametrize("which", ["cond", "nocond"])
def test_adapter_to_diffusers_matches(which, adapters, tmp_path):
    from helpers import diffusers_controlnet_error

    adapter = adapters[which]
    src = tmp_path / "adapter"
    save_adapter(adapter, src)
    out = tmp_path / "controlnet"
    result = run(src, out, "--to", "diffusers")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["conditioning_channels"] == 3 and "_codi_eqx_format" not in config
    assert "controlnet_cond_embedding.conv_in.weight" in SafetensorsFile(
        out / "diffusion_pytorch_model.safetensors")
    assert diffusers_controlnet_error(adapter, out) <= 1e-4
    # The exported ControlNet is also a source: back into the adapter format.
    back = tmp_path / "back"
    assert run(out, back).exit_code == 0
    if which == "cond":
        assert same(load_adapter(back), adapter)


@pytest.mark.parametrize("which", ["cond", "nocond"])
def test_adapter_single_file_round_trip(which, adapters, tmp_path):
    adapter = adapters[which]
    src = tmp_path / "adapter"
    save_adapter(adapter, src)
    out = tmp_path / "control.safetensors"
    result = run(src, out, "--to", "single-file")
    assert result.exit_code == 0, result.output
    f = SafetensorsFile(out)
    assert all(k.startswith("control_model.") for k in f)
    assert "control_model.input_hint_block.0.weight" in f
    assert "control_model.zero_convs.0.0.weight" in f and "control_model.middle_block_out.0.weight" in f
    assert same(sf.load_controlnet_original(f, metadata=f.metadata), adapter)
    back = tmp_path / "back"
    assert run(out, back).exit_code == 0
    assert same(load_adapter(back), adapter)


def test_original_controlnet_inferred_config(models, tmp_path):
    """An original ControlNet without this project's metadata: config read off the shapes."""
    unet, vae, text = _sd_conventions("sd1")
    adapter = randomized(ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16), vae_scale_factor=2,
        key=jax.random.key(9)), 10)
    src = tmp_path / "control_sd15_tiny.safetensors"
    save_file(sf.controlnet_to_original(adapter), src)
    out = tmp_path / "adapter"
    assert run(src, out).exit_code == 0
    assert same(load_adapter(out), adapter)


def test_original_controlnet_matches_diffusers_reader(adapters, pipe, tmp_path):
    import diffusers
    import torch

    adapter = adapters["cond"]
    folder = tmp_path / "cn"
    assert run(_saved(adapter, tmp_path / "a"), folder, "--to", "diffusers").exit_code == 0
    path = tmp_path / "control.safetensors"
    assert run(tmp_path / "a", path, "--to", "original").exit_code == 0
    got = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder),
                                                      local_files_only=True).state_dict()
    ref = diffusers.ControlNetModel.from_pretrained(folder).state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def _saved(adapter, folder: Path) -> Path:
    save_adapter(adapter, folder)
    return folder


# ------------------------------------------------------------------------------------------
# Failures: one line, exit code, nothing left behind


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _tampered(single_files, tmp_path, change) -> Path:
    tensors = dict(SafetensorsFile(single_files["sd1"]))
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("case,code,message", [
    ("missing_file", 1, "no such file"),
    ("truncated", 1, "truncated"),
    ("corrupt", 1, "corrupt"),
    ("unknown_layout", 1, "unknown key layout"),
    ("missing_tensor", 1, "missing tensor(s): model.diffusion_model.out.2.weight"),
    ("extra_tensor", 1, "unexpected tensor(s): model.diffusion_model.extra.weight"),
    ("shape", 1, "wrong shape"),
    ("dtype", 1, "unsupported dtype C64"),
    ("unknown_suffix", 2, "unknown file type"),
    ("bad_manifest", 1, "newer than this codi-eqx reads"),
])
def test_failures(case, code, message, single_files, pipe, tmp_path):
    src = tmp_path / "src.safetensors"
    if case == "missing_file":
        src = tmp_path / "nothing.safetensors"
    elif case == "truncated":
        data = single_files["sd1"].read_bytes()
        src.write_bytes(data[: len(data) - 100])
    elif case == "corrupt":
        src.write_bytes(struct.pack("<Q", 20) + b"not json at all!!!!!" + b"\0" * 8)
    elif case == "unknown_layout":
        save_file({"foo.weight": np.zeros((2, 2), np.float32)}, src)
    elif case == "missing_tensor":
        src = _tampered(single_files, tmp_path, lambda t: t.pop("model.diffusion_model.out.2.weight"))
    elif case == "extra_tensor":
        src = _tampered(single_files, tmp_path, lambda t: t.__setitem__(
            "model.diffusion_model.extra.weight", np.zeros(3, np.float32)))
    elif case == "shape":
        src = _tampered(single_files, tmp_path, lambda t: t.__setitem__(
            "model.diffusion_model.out.2.bias", np.zeros(5, np.float32)))
    elif case == "dtype":
        _write_raw(src, {"model.diffusion_model.x": {"dtype": "C64", "shape": [1],
                                                     "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "unknown_suffix":
        src = tmp_path / "model.onnx"
        src.write_bytes(b"x")
    elif case == "bad_manifest":
        src = tmp_path / "conv"
        shutil.copytree(pipe, src)
        (src / "codi_eqx.json").write_text(json.dumps(
            {"format": "codi-eqx-model", "version": 99, "dtype": "float32", "components": []}))
    out = tmp_path / "out"
    result = run(src, out, "--config", pipe) if case in ("missing_tensor", "extra_tensor", "shape") \
        else run(src, out)
    assert result.exit_code == code, result.output
    assert message in error_line(result)
    assert not out.exists()
    assert no_leftovers(tmp_path)


def test_existing_output_kept_without_overwrite(pipe, tmp_path, single_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run(pipe, out)
    assert result.exit_code == 2
    assert "--overwrite" in error_line(result)
    assert (out / "keep.txt").read_text() == "precious"
    # A failing conversion with --overwrite leaves the old output as it stood.
    bad = tmp_path / "bad.safetensors"
    save_file({"foo": np.zeros(1, np.float32)}, bad)
    assert run(bad, out, "--overwrite").exit_code == 1
    assert (out / "keep.txt").read_text() == "precious"
    assert run(pipe, out, "--overwrite").exit_code == 0
    assert (out / "codi_eqx.json").is_file() and not (out / "keep.txt").exists()
    assert no_leftovers(tmp_path)


def test_usage_errors(pipe, tmp_path):
    result = run(pipe, tmp_path / "o", "--dtype", "float8")
    assert result.exit_code == 2
    result = run(pipe, tmp_path / "o", "--to", "single-file")
    assert result.exit_code == 2 and "exports an adapter" in error_line(result)
    result = run(pipe, tmp_path / "o", "--config", pipe)
    assert result.exit_code == 2 and "--config" in error_line(result)
    assert not (tmp_path / "o").exists()
