"""The shipped built-in default: the shapes teacher loads in diffusers and in `load_pipeline`
with matching outputs, its adapters load, it stays small, and `codi train` / `codi sample`
without model flags use it."""

import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from codi_eqx import load_adapter, load_pipeline
from codi_eqx.toy import ADAPTERS, builtin_adapter, builtin_teacher
from codi_eqx.toy._builtin import BUILTIN_DIR


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_shipped_weights_are_small():
    total = sum(p.stat().st_size for p in BUILTIN_DIR.rglob("*") if p.is_file())
    assert total < 20 * 2**20, total
    for kind in ADAPTERS:
        assert (builtin_adapter(kind) / "config.json").exists()


def test_teacher_matches_diffusers():
    import jax
    import jax.numpy as jnp
    from diffusers import StableDiffusionPipeline

    root = builtin_teacher()
    ref = StableDiffusionPipeline.from_pretrained(str(root), safety_checker=None)
    ours = load_pipeline(root)
    prompt = "a red circle and a yellow square on a blue background"
    ids = ours.tokenize([prompt])
    ref_ids = ref.tokenizer([prompt], padding="max_length", truncation=True,
                            max_length=ref.tokenizer.model_max_length, return_tensors="np").input_ids
    assert np.array_equal(np.asarray(ids), ref_ids)
    with torch.no_grad():
        ref_text = ref.text_encoder(torch.from_numpy(ref_ids)).last_hidden_state.numpy()
    text = jax.vmap(ours.text_encoder)(ids)
    assert _rel(text, ref_text) < 1e-4
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([20, 700])
    emb = np.repeat(ref_text, 2, axis=0)
    with torch.no_grad():
        ref_out = ref.unet(torch.from_numpy(z), torch.from_numpy(t),
                           encoder_hidden_states=torch.from_numpy(emb)).sample.numpy()
        ref_img = ref.vae.decode(torch.from_numpy(z)).sample.numpy()
    out = jax.vmap(ours.unet)(jnp.asarray(z), jnp.asarray(t), jnp.asarray(emb))
    assert _rel(out, ref_out) < 1e-4
    img = jax.vmap(ours.vae.decode)(jnp.asarray(z))
    assert _rel(img, ref_img) < 1e-4
    assert ours.vae_scale_factor == 4 and ours.prediction_type == "epsilon"
    assert ours.vae.scaling_factor == ref.vae.config.scaling_factor


@pytest.mark.slow
def test_edge_adapter_matches_diffusers_controlnet():
    import jax
    import jax.numpy as jnp
    from diffusers import ControlNetModel as TorchControlNet

    from codi_eqx.toy import shapes

    ref = TorchControlNet.from_pretrained(str(builtin_adapter("edges"))).eval()
    ours = load_adapter(builtin_adapter("edges"))
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    emb = rng.standard_normal((1, 16, 64)).astype(np.float32)
    cond = shapes.edge_images(shapes.scenes(0, 1, "heldout")).transpose(0, 3, 1, 2) / 255.0
    cond = cond.astype(np.float32)
    with torch.no_grad():
        down, mid = ref(torch.from_numpy(z), torch.tensor([500]), torch.from_numpy(emb),
                        controlnet_cond=torch.from_numpy(cond), return_dict=False)
    o_down, o_mid = jax.vmap(lambda a, b, c: ours(a, 500, b, c))(
        jnp.asarray(z), jnp.asarray(emb), jnp.asarray(cond))
    assert _rel(o_mid, mid.numpy()) < 1e-4
    for a, b in zip(o_down, down):
        assert _rel(a, b.numpy()) < 1e-4


def _app(*commands):
    app = typer.Typer(pretty_exceptions_enable=False)
    for name, fn in commands:
        app.command(name)(fn)
    return app


def test_codi_sample_without_a_model_uses_the_builtin_default(tmp_path):
    from cli.sample import sample

    app = _app(("sample", sample), ("other", lambda: None))
    out = tmp_path / "s.png"
    r = CliRunner().invoke(app, ["sample", "--output", str(out), "--steps", "2"])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (64, 64)
    assert (tmp_path / "s-edges.png").exists()
    # Any caption in the grammar works; its edge map is drawn for it.
    out2 = tmp_path / "t.png"
    r = CliRunner().invoke(app, ["sample", "--prompt", "a black triangle on a white background",
                                 "--output", str(out2), "--steps", "1", "--num_images", "2"])
    assert r.exit_code == 0, r.output
    with Image.open(out2) as im:
        assert im.size == (128, 64)
    bad = CliRunner().invoke(app, ["sample", "--prompt", "a photo of a cat", "--output",
                                   str(tmp_path / "u.png")])
    assert bad.exit_code == 2 and "grammar" in bad.output


@pytest.mark.slow
def test_codi_train_without_model_or_data_distils_the_builtin_teacher(tmp_path):
    from cli.train import train

    app = _app(("train", train), ("other", lambda: None))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--output_dir", str(out), "--max_train_steps", "2",
                                 "--train_batch_size", "2"])
    assert r.exit_code == 0, r.output
    assert "built-in" in r.output
    adapter = load_adapter(out)
    assert adapter.controlnet_cond_embedding is not None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert (out / "shapes-data" / "meta.jsonl").exists()
    assert list((out / "validation").glob("*.png"))
