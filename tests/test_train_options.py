"""`codi train` options beyond the basic run of test_train.py: the latent cache, rematerialisation,
full CoDi, bf16, unconditional distillation, checkpoint pruning, SIGTERM, trackers that are not
installed, and the checks of the validation inputs.

Each option set costs one compilation of the training step (the loop caches compiled steps per
option set in-process), so the runs are few and combine options: three compilations in all
(cache + full CoDi, the same with rematerialisation, unconditional bf16)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke, make_seed_folder, make_tiny_pipeline, rows, signal_after, why
from PIL import Image

# Every test here trains (several option sets, one compile each): the slow set.
pytestmark = pytest.mark.slow


def args(model, data, out, *extra, steps=4, ckpt=2):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data,
            "--output_dir", out, "--resolution", 32, "--max_train_steps", steps,
            "--checkpointing_steps", ckpt, "--distill_learning_steps", 10, *extra]


def plain_folder(root: Path, n: int = 8) -> Path:
    """An imagefolder without condition images; captions are lists (a random choice each)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a {i}", f"b {i}"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-options")
    model = make_tiny_pipeline(root / "model")
    data = make_seed_folder(root / "data", n=8)
    plain = plain_folder(root / "plain")
    return root, model, data, plain


def losses(out, key="loss"):
    return np.array([r[key] for r in rows(out)])


def encoded(output: str) -> str:
    [line] = [x for x in output.splitlines() if "latent cache" in x and "encoded" in x]
    return line


# --- the latent cache, full CoDi, SIGTERM, pruning, rematerialisation --------------------------


@pytest.fixture(scope="module")
def cached(env):
    """Full CoDi with --cache_latents (8 examples: 2 steps of 4 per epoch).
    C1: fills the cache, checkpoints every step with --checkpoints_total_limit 2, gets SIGTERM
    after step 3 (the CLI's run of the library's `train`, given hooks that send it), and is
    resumed to step 4. C2: the same run uninterrupted, reading the cache.
    C3: C2 with --gradient_checkpointing."""
    import functools
    import signal

    import codi_eqx.train

    root, model, data, _ = env
    cache = root / "cache"
    opts = ("--full_codi", "--cache_latents", cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codi_eqx.train, "train", functools.partial(
            codi_eqx.train.train, hooks=signal_after(3, signal.SIGTERM)))
        c1 = invoke(*args(model, data, root / "C1", *opts, "--checkpoints_total_limit", 2,
                          ckpt=1))
    after_sigterm = sorted(p.name for p in (root / "C1" / "checkpoints").iterdir())
    final_after_sigterm = [n for n in ("unet", "config.json") if (root / "C1" / n).exists()]
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    c1r = invoke(*args(model, data, root / "C1", *opts, "--checkpoints_total_limit", 2,
                       "--resume_from_checkpoint", "latest", ckpt=1))
    c2 = invoke(*args(model, data, root / "C2", *opts))
    c3 = invoke(*args(model, data, root / "C3", *opts, "--gradient_checkpointing"))
    return dict(root=root, cache=cache, files=files, c1=c1, c1r=c1r, c2=c2, c3=c3,
                after_sigterm=after_sigterm, final_after_sigterm=final_after_sigterm)


def test_cache_latents_first_run_encodes_each_example_once(cached):
    root, cache, c1 = cached["root"], cached["cache"], cached["c1"]
    assert c1.exit_code == 143, why(c1)  # SIGTERM after step 3
    # 8 images and 8 captions in epoch 0 (steps 1-2); step 3 (epoch 1) reads them back.
    assert "encoded 8 image(s) and 8 caption(s)" in encoded(c1.output)
    assert len(list((cache / "latents").rglob("*.npz"))) == 8
    assert len(list((cache / "text").rglob("*.npy"))) == 8
    assert json.loads((cache / "cache.json").read_text())["resolution"] == 32
    assert cached["c1r"].exit_code == 0, why(cached["c1r"])
    m = losses(root / "C1")
    assert len(m) == 4 and np.isfinite(m).all()


def test_cache_latents_later_runs_skip_the_encoders_with_the_same_losses(cached):
    root, cache = cached["root"], cached["cache"]
    for r in (cached["c1r"], cached["c2"]):
        assert r.exit_code == 0, why(r)
        assert "encoded 0 image(s) and 0 caption(s)" in encoded(r.output)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == cached["files"]
    # C1 (interrupted by SIGTERM, resumed) and C2 (uninterrupted) agree exactly.
    for key in ("loss", "loss_consistency", "loss_regularizer", "grad_norm"):
        np.testing.assert_array_equal(losses(root / "C1", key), losses(root / "C2", key))


def test_sigterm_checkpoints_prune_and_full_codi_saves_the_ema_unet(cached, env):
    import jax

    from weights_conversion import load_adapter, load_unet

    root, model = cached["root"], env[1]
    c1 = cached["c1"]
    assert "interrupted at step 3" in c1.output and "Traceback" not in c1.output
    # A checkpoint every step, the newest 2 kept; nothing final from an interrupted run.
    assert cached["after_sigterm"] == ["checkpoint-2", "checkpoint-3"]
    assert cached["final_after_sigterm"] == []
    out = root / "C1"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-3", "checkpoint-4"]
    assert [x["step"] for x in rows(out)] == [1, 2, 3, 4]
    trained, base = load_unet(out / "unet"), load_unet(Path(model) / "unet")
    lt, lb = jax.tree.leaves(trained), jax.tree.leaves(base)
    assert len(lt) == len(lb) > 0
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lt, lb))
    assert load_adapter(out).controlnet_cond_embedding is not None
    for a, b in zip(lt, jax.tree.leaves(load_unet(root / "C2" / "unet"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_checkpointing_gives_the_same_losses(cached):
    import jax

    from weights_conversion import load_adapter

    root, c3 = cached["root"], cached["c3"]
    assert c3.exit_code == 0, why(c3)
    assert "encoded 0 image(s)" in encoded(c3.output)
    np.testing.assert_allclose(losses(root / "C3"), losses(root / "C2"), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(load_adapter(root / "C2")),
                    jax.tree.leaves(load_adapter(root / "C3"))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_cached_form_matches_what_the_step_would_encode(env):
    """The batch fed from the cache gives the step the same x0 and text as pixels + ids."""
    import jax
    import jax.numpy as jnp

    from codi_eqx import load_pipeline
    from codi_eqx.distill import make_frozen
    from codi_eqx.distill._loss import example_latents, example_text
    from codi_eqx.train._batches import Encoders as _Encoders

    _, model, _, _ = env
    pipe = load_pipeline(model)
    enc = _Encoders(pipe, batch_size=4)
    px = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    captions = ["caption 1", "", "caption 2"]
    mean, logvar = enc.encode_images(px)
    emb = enc.encode_texts(captions)
    assert (enc.images, enc.captions) == (3, 3) and mean.shape == (3, 4, 4, 4)
    frozen = make_frozen(pipe.unet, pipe.vae, pipe.text_encoder, pipe.schedule,
                         null_input_ids=pipe.tokenize([""])[0])
    ids = np.asarray(pipe.tokenize(captions))
    noise = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4))
    for i in range(3):
        direct = example_latents(frozen, {"pixel_values": jnp.asarray(px[i])}, noise)
        cached = example_latents(frozen, {"latent_mean": mean[i], "latent_logvar": logvar[i],
                                        "scaling_factor": pipe.vae.scaling_factor}, noise)
        np.testing.assert_allclose(np.asarray(cached), np.asarray(direct), rtol=1e-5, atol=1e-5)
        text = example_text(frozen, {"input_ids": jnp.asarray(ids[i])})
        np.testing.assert_allclose(emb[i], np.asarray(text), rtol=1e-5, atol=1e-5)


def test_cache_made_for_something_else_is_a_usage_error(env, tmp_path):
    from codi_eqx.data import LatentCache

    root, model, data, _ = env
    LatentCache(tmp_path / "other", fingerprint="another-dataset", resolution=32)
    r = invoke(*args(model, data, tmp_path / "out", "--cache_latents", tmp_path / "other"))
    assert r.exit_code == 2, why(r)
    assert r.output.startswith("error: cache_latents") and "another dataset" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    (tmp_path / "file").write_text("x")
    r = invoke(*args(model, data, tmp_path / "out", "--cache_latents", tmp_path / "file"))
    assert r.exit_code == 2 and "not a folder" in r.output, r.output
    assert not (tmp_path / "out").exists()


# --- unconditional, bf16, trackers ---------------------------------------------------------------


def test_unconditional_bf16_without_trackers(env, monkeypatch):
    """--distill_type unconditional on a dataset without condition images, bf16 frozen models
    (under the tests' strict dtype promotion), --report_to all with neither library."""
    import jax
    import jax.numpy as jnp

    import codi_eqx._pipeline
    from weights_conversion import load_adapter

    root, model, _, plain = env
    for name in ("torch.utils.tensorboard", "tensorboardX", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails: not installed
    loaded = []
    real = codi_eqx._pipeline.load_pipeline

    def spy(*a, **kw):
        pipe = real(*a, **kw)
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(codi_eqx._pipeline, "load_pipeline", spy)
    out = root / "U"
    r = invoke(*args(model, plain, out, "--distill_type", "unconditional",
                     "--mixed_precision", "bf16", "--report_to", "all", steps=2))
    assert r.exit_code == 0, why(r)
    assert "report_to tensorboard: tensorboard is not installed" in r.output
    assert "report_to wandb: wandb is not installed" in r.output
    assert not (out / "logs").exists()
    [pipe] = loaded
    assert pipe.unet.dtype == jnp.bfloat16 and pipe.vae.encoder.conv_in.weight.dtype == jnp.bfloat16
    m = rows(out)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        for k in ("loss", "loss_consistency", "loss_regularizer", "grad_norm"):
            assert np.isfinite(x[k]), (k, x)
    config = json.loads((out / "config.json").read_text())
    assert config["conditioning_channels"] is None
    adapter = load_adapter(out)
    assert adapter.controlnet_cond_embedding is None
    assert all(np.asarray(a).dtype == np.float32 for a in jax.tree.leaves(adapter))


# --- validation inputs ---------------------------------------------------------------------------


def test_validation_image_missing_or_unreadable_is_a_usage_error(env, tmp_path):
    root, model, data, _ = env
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for image, needle in ((tmp_path / "missing.png", "no such file"),
                          (bad, "not a readable image")):
        r = invoke(*args(model, data, tmp_path / "out", "--validation_prompt", "a cat",
                         "--validation_image", image))
        assert r.exit_code == 2, why(r)
        assert r.output.startswith("error: validation_image") and needle in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()  # before any work
    r = invoke(*args(model, data, tmp_path / "out", "--validation_prompt", "a cat"))
    assert r.exit_code == 2 and "needs validation_image" in r.output, r.output
    r = invoke(*args(model, data, tmp_path / "out", "--validation_image",
                     data / "processed_images" / "image_0.png"))
    assert r.exit_code == 2 and "needs validation_prompt" in r.output, r.output
