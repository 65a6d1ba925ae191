"""`codi train`: an end-to-end run on a tiny diffusers-format model and a tiny dataset in the
seed's layout; checkpoints; exact resume; the NaN guard; corrupt images; the flags.

Every run uses the same options (4 steps, constant learning rate), so that the compiled
training step is shared by all of them (the loop caches it per option set)."""

import json
import os
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    base,
    invoke,
    library_run,
    make_seed_folder,
    make_tiny_pipeline,
    rows,
    signal_after,
    why,
    xla_flags,
)
from PIL import Image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_tiny_pipeline(root / "model")
    data = make_seed_folder(root / "data", n=8)
    bad = make_seed_folder(root / "bad", n=8)
    (bad / "images" / "image_5.png").write_bytes(b"not a png")
    return root, model, data, bad


@pytest.fixture(scope="module")
def runs(env):
    """A: 4 steps uninterrupted. B: the same run through the library, SIGINT after step 2
    (its summary). C: B resumed to 4. (The validation grids: `test_validation_grids`.)"""
    root, model, data, _ = env
    a = invoke(*base(model, data, root / "A"))
    b = library_run(model, data, root / "B", signal_after(2, signal.SIGINT))
    b = dict(b, final_adapter=(root / "B" / "config.json").exists())
    c = invoke(*base(model, data, root / "B", "--resume_from_checkpoint", "latest"))
    return root, a, b, c


def test_end_to_end_run_writes_adapter_checkpoints_and_metrics(runs):
    from weights_conversion import load_adapter

    root, a, _, _ = runs
    assert a.exit_code == 0, why(a)
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
    assert not (out / "validation").exists()  # no validation prompt given


@pytest.mark.slow
def test_validation_grids(env, runs):
    """With a validation prompt and image: the EMA adapter's few-step grid at each validation
    step, the teacher's 50-step DDIM grid beside the first; the run's losses are A's."""
    root, model, data, _ = env
    out = root / "validation-run"
    r = invoke(*base(model, data, out, "--validation_prompt", "a cat",
                     "--validation_image", data / "processed_images" / "image_0.png",
                     "--validation_steps", 2, "--num_validation_images", 2,
                     "--validation_inference_steps", 2))
    assert r.exit_code == 0, why(r)
    for name in ("step-0000002.png", "step-0000004.png", "teacher-ddim.png"):
        with Image.open(out / "validation" / name) as im:
            assert im.size == (64, 32)  # 2 images of 32 x 32 in a row
    assert [x["loss"] for x in rows(out)] == [x["loss"] for x in rows(root / "A")]


def test_interrupt_checkpoints_and_resume_is_exact(runs):
    import jax

    from weights_conversion import load_adapter

    root, a, b, c = runs
    assert b["interrupted"] == signal.SIGINT and b["step"] == 2, b
    assert b["checkpoint"] == str(root / "B" / "checkpoints" / "checkpoint-2")
    assert not b["final_adapter"]  # no final adapter from an interrupted run
    assert c.exit_code == 0, why(c)
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


def test_nan_guard_and_corrupt_images(env, runs, capsys):
    from codi_eqx.train import TrainHooks, TrainingError

    root, model, _, bad = env
    out = root / "D"

    def nan_at_step_3(step, batch):
        if step != 3:
            return batch
        return {**batch, "pixel_values": batch["pixel_values"] * np.float32("nan")}

    with pytest.raises(TrainingError) as e:
        library_run(model, bad, out, TrainHooks(on_batch=nan_at_step_3))
    message = str(e.value)
    assert "non-finite loss at step 3" in message and "\n" not in message
    assert "checkpoint-2" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / "config.json").exists()  # no final adapter from a failed run
    assert "skipped 1 unreadable image" in capsys.readouterr().err
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
        assert "from_pt ignored" in r.output and "'v_prediction'" in r.output
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


@pytest.mark.slow
def test_kill_9_then_resume_matches_the_uninterrupted_run(env, runs):
    """A run killed with SIGKILL after its first checkpoint resumes to the same adapter."""
    import signal
    import subprocess
    import sys
    import time

    import jax

    from weights_conversion import load_adapter

    root, model, data, _ = env
    out = root / "K"
    args = [str(a) for a in base(model, data, out)]
    args[args.index("--checkpointing-steps") + 1] = "1"
    code = ("import typer; from cli.train import train; app = typer.Typer(); "
            "app.command()(train); app()")
    env_vars = {**os.environ, "XLA_FLAGS": xla_flags(4)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=Path(__file__).parents[1],
                            env=env_vars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not (out / "checkpoints" / "checkpoint-1" / "checkpoint.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended too early"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    r = invoke(*base(model, data, out, "--resume_from_checkpoint", "latest"))
    assert r.exit_code == 0, why(r)
    for x, y in zip(jax.tree.leaves(load_adapter(root / "A")), jax.tree.leaves(load_adapter(out))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [row["loss"] for row in rows(out)] == [row["loss"] for row in rows(root / "A")]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(env, runs):
    """`codi train --coordinator_address ... --num_processes 2 --process_id i`: 2 processes x 2
    simulated CPU devices log the losses of the single-process 4-device run A, and only
    process 0 writes."""
    import subprocess
    import sys

    root, model, data, _ = env
    out = root / "multihost"
    port = _free_port()
    here = Path(__file__).parent
    child_env = {**os.environ, "XLA_FLAGS": xla_flags(2),
                 "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]), "COLUMNS": "200"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "from cli.main import app; app()", "train",
             *map(str, base(model, data, out)), "--coordinator_address", f"127.0.0.1:{port}",
             "--num_processes", "2", "--process_id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    got, want = rows(out), rows(root / "A")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        print(f"[multihost] step {g['step']}: loss {g['loss']:.6e} vs one process {w['loss']:.6e}")
        assert abs(g["loss"] - w["loss"]) <= 1e-5 * abs(w["loss"])
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
