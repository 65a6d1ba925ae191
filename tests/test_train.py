"""`codi train`: an end-to-end run on a tiny diffusers-format model and a tiny dataset in the
seed's layout; checkpoints; exact resume; the NaN guard; corrupt images; the flags.

Every run uses the same options (4 steps, constant learning rate), so that the compiled
training step is shared by all of them (the loop caches it per option set)."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.train import train
from test_data import make_seed_folder
from tiny_models import make_tiny_pipeline

app = typer.Typer()
app.command()(train)
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "240", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_tiny_pipeline(root / "model")
    data = make_seed_folder(root / "data", n=8)
    bad = make_seed_folder(root / "bad", n=8)
    (bad / "images" / "image_5.png").write_bytes(b"not a png")
    return root, model, data, bad


def base(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data,
            "--output_dir", out, "--resolution", 32, "--max_train_steps", 4,
            "--checkpointing-steps", 2, "--distill_learning_steps", 10, *extra]


@pytest.fixture(scope="module")
def runs(env):
    """A: 4 steps uninterrupted. B: the same run, SIGINT after step 2. C: B resumed to 4."""
    root, model, data, _ = env
    a = invoke(*base(model, data, root / "A"))
    b = invoke(*base(model, data, root / "B", "--debug_signal_at_step", 2))
    c = invoke(*base(model, data, root / "B", "--resume_from_checkpoint", "latest"))
    return root, a, b, c


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_writes_adapter_checkpoints_and_metrics(runs):
    from weights_conversion import load_adapter

    root, a, _, _ = runs
    assert a.exit_code == 0, a.output
    out = root / "A"
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for name in ("adapter/config.json", "state.eqx", "data.json", "config.json", "checkpoint.json"):
        assert (out / "checkpoints" / "checkpoint-2" / name).is_file()
    m = rows(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    for r in m:
        for k in ("loss", "loss_consistency", "loss_regularizer", "grad_norm", "lr",
                  "examples_per_sec", "epoch"):
            assert np.isfinite(r[k]), (k, r)
    assert [r["epoch"] for r in m] == [0, 0, 1, 1]  # 8 examples, global batch 4
    adapter = load_adapter(out)
    assert adapter.controlnet_cond_embedding is not None


def test_interrupt_checkpoints_and_resume_is_exact(runs):
    from weights_conversion import load_adapter
    import jax

    root, a, b, c = runs
    assert b.exit_code == 130, b.output
    assert "interrupted at step 2" in b.output
    assert c.exit_code == 0, c.output
    a_ad, c_ad = load_adapter(root / "A"), load_adapter(root / "B")
    la, lc = jax.tree.leaves(a_ad), jax.tree.leaves(c_ad)
    assert len(la) == len(lc) > 0
    for x, y in zip(la, lc):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ma, mc = rows(root / "A"), rows(root / "B")
    assert [r["step"] for r in mc] == [1, 2, 3, 4]
    for ra, rc in zip(ma, mc):
        for k in ("loss", "loss_consistency", "loss_regularizer", "grad_norm", "lr"):
            assert ra[k] == rc[k], (k, ra["step"])


def test_nan_guard_and_corrupt_images(env, runs):
    root, model, _, bad = env
    out = root / "D"
    r = invoke(*base(model, bad, out, "--debug_nan_at_step", 3))
    assert r.exit_code == 1, r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite loss at step 3" in err[0]
    assert "checkpoint-2" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / "config.json").exists()  # no final adapter from a failed run
    assert "skipped 1 unreadable image" in r.output
    assert rows(out)[-1]["skipped_images"] == 1
    strict = invoke(*base(model, bad, root / "E", "--strict"))
    assert strict.exit_code == 1 and "unreadable image" in strict.output, strict.output
    assert "Traceback" not in strict.output


def test_help_lists_the_flags():
    r = invoke("--help")
    assert r.exit_code == 0
    for flag in ("--pretrained_model_name_or_path", "--learning-rate", "--conditioning_image",
                 "--onestepode_sample_eps", "--resume_from_checkpoint", "--mixed_precision"):
        assert flag in r.output


SEED_HF = """--pretrained_model_name_or_path=$MODEL_DIR --output_dir=$OUTPUT_DIR
 --dataset_name=$DATASET_NAME --load_from_disk --cache_dir=$DISK_DIR --resolution=512
 --learning_rate=1e-5 --train_batch_size=2 --revision="non-ema" --from_pt
 --max_train_steps=500000 --checkpointing_steps=10000 --dataloader_num_workers=16
 --distill_learning_steps 50 --onestepode control --onestepode_control_params target
 --onestepode_sample_eps v_prediction --distill_loss consistency_x
 --image_column original_image --caption_column prompt --conditioning_image transformed_image"""

SEED_LOCAL = """--pretrained_model_name_or_path=$MODEL_DIR --output_dir=$OUTPUT_DIR
 --train_data_dir=$DATASET_DIR --load_from_disk --cache_dir=$DISK_DIR --resolution=512
 --learning_rate=1e-5 --train_batch_size=2 --revision="non-ema" --from_pt
 --max_train_steps=500000 --checkpointing_steps=10000 --dataloader_num_workers=16
 --distill_learning_steps 50 --onestepode control --onestepode_control_params target
 --onestepode_sample_eps v_prediction --distill_loss consistency_x"""


def test_seed_readme_commands_parse(env):
    root, model, data, _ = env
    hf = root / "hf"
    (hf / "images").mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.new("RGB", (40, 40), (i, 0, 0)).save(hf / "images" / f"{i}.png")
        lines.append(json.dumps({"original_image": f"images/{i}.png", "prompt": f"p {i}",
                                 "transformed_image": f"images/{i}.png"}))
    (hf / "meta.jsonl").write_text("\n".join(lines) + "\n")
    variables = {"MODEL_DIR": model, "OUTPUT_DIR": root / "seed-out", "DATASET_NAME": hf,
                 "DATASET_DIR": data, "DISK_DIR": root / "cache"}
    for command in (SEED_HF, SEED_LOCAL):
        for k, v in variables.items():
            command = command.replace(f"${k}", str(v))
        r = invoke(*shlex.split(command), "--dry_run")
        assert r.exit_code == 0, r.output
        plan = json.loads(r.stdout)
        assert plan["max_train_steps"] == 500000 and plan["global_batch_size"] == 8  # 4 devices
        assert plan["prediction_type"] == "epsilon" and plan["conditioned"]
        assert plan["config"]["checkpointing_steps"] == 10000
        assert "--from_pt ignored" in r.output and "'v_prediction'" in r.output
    assert not (root / "seed-out").exists()


def test_bad_inputs_are_one_line_usage_errors(env, tmp_path):
    root, model, data, _ = env
    cases = [
        (["--pretrained_model_name_or_path", tmp_path / "nope", "--train_data_dir", data],
         "nope"),
        (["--pretrained_model_name_or_path", model, "--train_data_dir", data,
          "--image_column", "photo"], "photo"),
        (["--pretrained_model_name_or_path", model, "--train_data_dir", data,
          "--resolution", 36], "divisible by the VAE factor 8"),
        (["--pretrained_model_name_or_path", model, "--train_data_dir", data,
          "--train_batch_size", 4], "fewer than one global batch"),
    ]
    for args, needle in cases:
        r = invoke(*args, "--output_dir", tmp_path / "out", "--resolution", 32, "--dry_run") \
            if "--resolution" not in args else invoke(*args, "--output_dir", tmp_path / "o",
                                                      "--dry_run")
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
        assert needle in r.output, r.output
