"""A trained adapter's record of what sampling needs (`_codi_eqx_distillation` in its
config.json): round trip, diffusers still loads the folder, `generate` and `codi sample`
default to it, flags against it get a note, a forced prediction type reaches the samplers."""

import dataclasses
import json

import equinox as eqx
import jax
import numpy as np
import pytest
import typer
from helpers import diffusers_controlnet_error, make_tiny_pipeline, perturb
from PIL import Image
from typer.testing import CliRunner

from cli.convert import convert_weights
from cli.sample import sample
from codi_eqx import (
    ADAPTER_SETTINGS_KEY,
    AdapterSettings,
    ControlNetModel,
    adapter_settings,
    load_adapter,
    load_pipeline,
    save_adapter,
)
from codi_eqx.diffusion import codi_sampling_timesteps
from codi_eqx.sampling import contradictions, generate, sampler_timesteps, sampling_options

app = typer.Typer(pretty_exceptions_enable=False)
app.command("sample")(sample)
app.command("convert-weights")(convert_weights)

N20 = AdapterSettings(distill_learning_steps=20, distill_timestep_scaling=10.0,
                      prediction_type="epsilon", distill_type="unconditional")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-settings")
    model = make_tiny_pipeline(root / "model")
    pipe = load_pipeline(model)
    plain = ControlNetModel.from_unet(pipe.unet, conditioning_channels=None, key=jax.random.key(0))
    save_adapter(plain, root / "n20", settings=dataclasses.replace(N20, base_model=str(model)))
    return root, model, pipe, plain


def test_record_round_trips_and_the_folder_stays_a_controlnet(tmp_path):
    pipe = load_pipeline(make_tiny_pipeline(tmp_path / "model"))
    adapter = ControlNetModel.from_unet(pipe.unet, conditioning_channels=3, key=jax.random.key(1))
    adapter = perturb(adapter, jax.random.key(2))  # non-zero residuals, so that outputs tell
    want = AdapterSettings(objective="controlnet", distill_learning_steps=20,
                           distill_timestep_scaling=5.0, prediction_type="sample",
                           prediction_type_forced=True, cfg_aware_distill=True,
                           distill_guidance_min=3.0, distill_guidance_max=9.0,
                           base_model="some/model")
    save_adapter(adapter, tmp_path / "a", settings=want)
    assert adapter_settings(tmp_path / "a") == want
    record = json.loads((tmp_path / "a" / "config.json").read_text())[ADAPTER_SETTINGS_KEY]
    assert record["version"] == 1 and record["distill_learning_steps"] == 20
    assert bool(eqx.tree_equal(load_adapter(tmp_path / "a"), adapter))
    # diffusers ignores the "_" keys, and computes what the adapter computes.
    assert diffusers_controlnet_error(adapter, tmp_path / "a") <= 1e-4
    # The export to diffusers carries the record, and diffusers loads it.
    r = CliRunner().invoke(app, ["convert-weights", str(tmp_path / "a"), str(tmp_path / "x"),
                                 "--to", "diffusers"])
    assert r.exit_code == 0, r.output
    assert adapter_settings(tmp_path / "x") == want
    assert diffusers_controlnet_error(adapter, tmp_path / "x") <= 1e-4
    # No record: None; a broken one: a one-line error.
    save_adapter(adapter, tmp_path / "bare")
    assert adapter_settings(tmp_path / "bare") is None
    assert adapter_settings(tmp_path / "nowhere") is None
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config[ADAPTER_SETTINGS_KEY]["objective"] = "unknown"
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=ADAPTER_SETTINGS_KEY):
        adapter_settings(tmp_path / "a")


def test_sampling_options_default_to_the_record():
    opts = sampling_options(N20, "v_prediction")
    assert (opts.sampler, opts.distill_learning_steps, opts.prediction_type) == ("codi", 20, "epsilon")
    # generate's timesteps for the record are N = 20's, not the default N = 50's.
    from codi_eqx.diffusion import NoiseSchedule

    schedule = NoiseSchedule.from_config({})
    ts, _ = sampler_timesteps(opts.sampler, 4, schedule, {}, opts.distill_learning_steps)
    assert list(ts) == codi_sampling_timesteps(1000, 20, 4) == [950, 700, 450, 200]
    assert list(ts) != codi_sampling_timesteps(1000, 50, 4)
    assert contradictions(N20, opts) == []
    # Without a record: the defaults and the model's prediction type.
    bare = sampling_options(None, "v_prediction")
    assert (bare.sampler, bare.distill_learning_steps, bare.timestep_scaling,
            bare.prediction_type) == ("codi", 50, 10.0, "v_prediction")
    # The controlnet objective samples with DDIM; explicit values win, and are reported.
    cn = AdapterSettings(objective="controlnet", cfg_aware_distill=True)
    assert sampling_options(cn, "epsilon").sampler == "ddim"
    forced = sampling_options(cn, "epsilon", sampler="codi", distill_learning_steps=10,
                              prediction_type="xprediction")
    assert (forced.sampler, forced.distill_learning_steps, forced.prediction_type) == (
        "codi", 10, "sample")
    assert contradictions(cn, forced, guidance_scale=1.0) == [
        ("sampler", "codi", "ddim"), ("distill_learning_steps", 10, 50),
        ("prediction_type", "sample", "epsilon"), ("guidance_scale", 1.0, (2.0, 14.0))]


def _run_sample(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def test_codi_sample_uses_the_adapters_n_and_notes_contradicting_flags(files, tmp_path):
    root, model, pipe, plain = files
    out = tmp_path / "a.png"
    r = _run_sample("--model", model, "--adapter", root / "n20", "--prompt", "a cat",
                    "--seed", 2, "--output", out)
    assert r.exit_code == 0, r.output
    assert "note:" not in r.stderr, r.stderr
    with Image.open(out) as im:
        got, meta = np.asarray(im), dict(im.text)
    assert meta["distill_learning_steps"] == "20" and meta["sampler"] == "codi"
    want = generate(pipe, plain, ["a cat"], seed=2, distill_learning_steps=20)
    np.testing.assert_array_equal(got, want[0])
    # A flag against the record wins, with a one-line note naming both values.
    out50 = tmp_path / "b.png"
    r = _run_sample("--model", model, "--adapter", root / "n20", "--prompt", "a cat",
                    "--seed", 2, "--distill_learning_steps", 50, "--output", out50)
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: --distill_learning_steps 50 overrides the adapter's 20 (the value "
                     "it was trained with)"], r.stderr
    with Image.open(out50) as im:
        assert not np.array_equal(np.asarray(im), got)


def test_forced_prediction_type_reaches_the_sampler(files):
    _, _, pipe, plain = files
    forced = AdapterSettings(prediction_type="sample", prediction_type_forced=True)
    plain_eps = generate(pipe, plain, ["a cat"], seed=4)
    from_record = generate(pipe, plain, ["a cat"], seed=4, settings=forced)
    explicit = generate(pipe, plain, ["a cat"], seed=4, prediction_type="sample")
    np.testing.assert_array_equal(from_record, explicit)
    assert np.abs(from_record.astype(int) - plain_eps.astype(int)).max() > 0
