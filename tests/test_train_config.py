"""`TrainConfig` as the one definition of `codi train`'s options: the command line has a flag
for every field (both spellings, the same default and help, in its panel), the
sub-configurations receive every field mapped to them and share their defaults, and the
config's own checks name the field."""

import dataclasses
import typing

import pytest
import typer
from typer.testing import CliRunner

import cli.train
from codi_eqx.data import DataConfig
from codi_eqx.distill import DistillConfig, OptimConfig
from codi_eqx.train import TrainConfig, TrainConfigError
from codi_eqx.train._config import SUB_CONFIG_FIELDS, mapped_fields, training_options

runner = CliRunner()


def _app():
    app = typer.Typer()
    app.command("train")(cli.train.train)
    app.command("other")(lambda: None)  # a group: `train` is a subcommand, as in `codi`
    return app


def _click_params():
    command = typer.main.get_command(_app()).commands["train"]
    return {p.name: p for p in command.params}


def test_every_field_is_a_flag_with_its_default_and_help():
    params = _click_params()
    fields = dataclasses.fields(TrainConfig)
    assert {f.name for f in fields} | set(cli.train.CLI_ONLY) == set(params)
    for f in fields:
        p = params[f.name]
        assert f"--{f.name}" in p.opts and f"--{f.name.replace('_', '-')}" in p.opts, p.opts
        default = tuple(p.default) if isinstance(f.default, tuple) else p.default
        assert default == f.default, f.name
        assert p.help == f.metadata["help"] and p.help, f.name
    for name, alias in (("conditioning_image_column", "--conditioning_image"),
                        ("conditioning_image_column", "--conditioning-image"),
                        ("regularizer_weight", "--x0_regularizer_weight")):
        assert alias in params[name].opts


def test_choices_come_from_the_literal_types():
    options = {o.name: o for o in training_options()}
    assert options["mixed_precision"].choices == ("no", "bf16", "fp16")
    assert options["report_to"].choices == ("tensorboard", "wandb", "all", "none")
    assert options["objective"].choices == ("codi", "controlnet")
    assert options["onestepode_sample_eps"].choices is None  # any spelling of a type
    r = runner.invoke(_app(), ["train", "--mixed_precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output


def test_help_lists_the_panels():
    r = runner.invoke(_app(), ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    for panel in ("Options", "Data", "Optimisation", "Distillation",
                  "Logging, checkpoints, validation", "Multi-host", "Compilation cache"):
        assert f"─ {panel} ─" in r.output, panel
    assert "Seed of the initialisation, data order and noise." in r.output
    assert "<no|bf16|fp16>" in r.output


def test_aliases_and_repeatable_flags_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli.train, "_run", lambda values, dry_run, given: seen.update(
        values=values, dry_run=dry_run, given=given))
    r = runner.invoke(_app(), [
        "train", "--pretrained-model-name-or-path", "m", "--x0_regularizer_weight", "0.5",
        "--conditioning_image", "edges", "--validation_prompt", "a", "--validation-prompt",
        "b", "--distill-type", "unconditional", "--dry_run"])
    assert r.exit_code == 0, r.output
    values = seen["values"]
    assert not set(cli.train.CLI_ONLY) & set(values)
    assert seen["dry_run"] and "regularizer_weight" in seen["given"]
    config = TrainConfig(**values)
    assert config.regularizer_weight == 0.5 and config.conditioning_image_column == "edges"
    assert config.validation_prompt == ("a", "b")
    assert config == TrainConfig(pretrained_model_name_or_path="m", regularizer_weight=0.5,
                                 conditioning_image_column="edges",
                                 validation_prompt=("a", "b"), distill_type="unconditional")


# --- the sub-configurations ----------------------------------------------------------------------

# A valid value other than the default for every TrainConfig field mapped to a sub-config.
NON_DEFAULT = {
    # DistillConfig
    "distill_type": "unconditional", "onestepode": "uncontrol",
    "onestepode_control_params": "online", "onestepode_cfg": True,
    "onestepode_true_noise": True, "cfg_aware_distill": True, "distill_guidance_min": 3.0,
    "distill_guidance_max": 13.0, "guidance_draw": "per_batch_integer",
    "distill_loss": "consistency_epsilon", "snr_gamma": 5.0, "regularizer_weight": 0.25,
    "distill_learning_steps": 20, "distill_timestep_scaling": 7.0, "shared_timestep": True,
    "full_codi": True, "regularizer_snr_gamma": 1.0, "regularizer_target": "guided",
    "guidance_embedding": True, "regularizer_guidance_scaling": "alpha",
    # OptimConfig
    "lr_scheduler": "cosine", "lr_warmup_steps": 3, "adam_beta1": 0.8, "adam_beta2": 0.99,
    "adam_epsilon": 1e-6, "adam_weight_decay": 0.1, "max_grad_norm": 2.0, "ema_decay": 0.5,
    # DataConfig
    "train_data_dir": "data", "dataset_name": "hub/name", "dataset_config_name": "cfg",
    "load_from_disk": True, "cache_dir": "cache", "image_column": "im",
    "caption_column": "text", "conditioning_image_column": "cond", "resolution": 256,
    "proportion_empty_prompts": 0.25, "max_train_samples": 7,
}


def _sub_configs(config):
    return {DistillConfig: config.distill_config("v_prediction"),
            OptimConfig: config.optim_config(8, 100), DataConfig: config.data_config()}


def test_sub_configs_receive_every_mapped_field():
    mapped = {name for cls in SUB_CONFIG_FIELDS for name in mapped_fields(cls).values()}
    assert mapped - {"objective"} == set(NON_DEFAULT)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert all(NON_DEFAULT[k] != defaults[k] for k in NON_DEFAULT)
    config = TrainConfig(pretrained_model_name_or_path="m", **NON_DEFAULT)
    subs = _sub_configs(config)
    for cls, sub in subs.items():
        for sub_name, name in mapped_fields(cls).items():
            assert getattr(sub, sub_name) == getattr(config, name), (cls.__name__, sub_name)
    # `objective` cannot change together with the CoDi-only options.
    cn = TrainConfig(pretrained_model_name_or_path="m", objective="controlnet")
    assert cn.distill_config("epsilon").objective == "controlnet"
    # The computed fields.
    distill, optim, data = subs.values()
    assert distill.prediction_type == "v_prediction" and distill.compute_dtype == "float32"
    assert TrainConfig(pretrained_model_name_or_path="m", mixed_precision="bf16").distill_config(
        "epsilon").compute_dtype == "bfloat16"
    assert optim.max_train_steps == 100 and optim.learning_rate == config.learning_rate
    scaled = TrainConfig(pretrained_model_name_or_path="m", scale_lr=True).optim_config(8, 100)
    assert scaled.learning_rate == pytest.approx(8 * TrainConfig.learning_rate)
    assert data.unconditional  # distill_type unconditional


def test_sub_configs_and_train_config_share_their_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for cls in SUB_CONFIG_FIELDS:
        sub_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for sub_name, name in mapped_fields(cls).items():
            if name == "resolution":  # unset: filled from the model, SD 1.x / 2.x's as the data's
                from codi_eqx.train._plan import SD_RESOLUTION

                assert defaults[name] is None and sub_defaults[sub_name] == SD_RESOLUTION
                continue
            assert sub_defaults[sub_name] == defaults[name], (cls.__name__, sub_name)
    assert defaults["learning_rate"] == OptimConfig.learning_rate


def test_every_sub_config_field_is_accounted_for():
    for cls, spec in SUB_CONFIG_FIELDS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        mapped = mapped_fields(cls)
        assert set(mapped) | set(spec["computed"]) | set(spec["library_only"]) == names
        assert set(mapped.values()) <= {f.name for f in dataclasses.fields(TrainConfig)}


# --- the config's own checks -----------------------------------------------------------------------


@pytest.mark.parametrize("options, needle", [
    ({"max_train_steps": 0}, "max_train_steps must be at least 1 (got 0)"),
    ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be at least 1"),
    ({"dataloader_num_workers": -1}, "dataloader_num_workers must be 0 or more"),
    ({"resolution": -8}, "resolution must be positive"),
    ({"validation_image": ("a.png",)}, "validation_image needs validation_prompt"),
    ({"distill_guidance_min": 5.0, "distill_guidance_max": 4.0}, "distill_guidance_min"),
])
def test_errors_name_the_field(options, needle):
    with pytest.raises(TrainConfigError, match="^" + needle.split(" (")[0]):
        TrainConfig(pretrained_model_name_or_path="m", **options)
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(pretrained_model_name_or_path="m", **options)
    assert needle in str(e.value)


def test_the_cli_reports_a_config_error_on_one_line(tmp_path):
    r = runner.invoke(_app(), ["train", "--pretrained_model_name_or_path", "m",
                               "--max_train_steps", "0", "--dry_run"])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == "error: max_train_steps must be at least 1 (got 0)", r.output


def test_spellings_with_one_meaning_are_normalised():
    config = TrainConfig(pretrained_model_name_or_path="m", report_to="none", max_grad_norm=0.0)
    assert config.report_to is None and config.max_grad_norm is None
    assert config.optim_config(1, 1).max_grad_norm is None


def test_literal_types_resolve():
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["objective"]) == ("codi", "controlnet")
