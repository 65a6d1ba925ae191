"""The built-in teacher's pretraining resumes an interrupted run from its last checkpoint and
ends with the weights of an uninterrupted run."""

from __future__ import annotations

import jax
import pytest

from codi_eqx.toy import PretrainConfig, pretrain_teacher
from codi_eqx.toy._pretrain import CHECKPOINT, _load_denoiser_checkpoint

TINY = PretrainConfig(vae_steps=2, vae_batch_size=2, unet_steps=5, unet_batch_size=2,
                      warmup_steps=2)


class _Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's bias correction raises a float to an int32 count, which strict promotion
    # (the tests' default) refuses; the pretraining runs under JAX's standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _weights(folder):
    return {p.relative_to(folder): p.read_bytes()
            for p in sorted(folder.glob("*/*.safetensors"))}


@pytest.mark.slow
def test_interrupted_pretraining_resumes_bit_equal(tmp_path):
    whole = pretrain_teacher(tmp_path / "whole", TINY, checkpoint_every=2)

    def interrupt(n, row):
        if row["phase"] == "unet" and row["step"] == 3:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        pretrain_teacher(tmp_path / "resumed", TINY, progress=interrupt, checkpoint_every=2)
    partial = tmp_path / ".resumed.partial"
    assert (partial / CHECKPOINT / "state.json").is_file()
    assert not (tmp_path / "resumed").exists()  # nothing half-written where the model goes
    # a checkpoint made with another recipe is not resumed
    other, logs = PretrainConfig(**{**TINY.__dict__, "unet_learning_rate": 1e-4}), []
    assert _load_denoiser_checkpoint(partial / CHECKPOINT, None, other, logs.append) is None
    assert any("another recipe" in line for line in logs)

    logs, steps = [], []
    resumed = pretrain_teacher(tmp_path / "resumed", TINY, checkpoint_every=2, log=logs.append,
                               progress=lambda n, row: steps.append((row["phase"], n)))
    assert any("reusing the VAE" in line for line in logs)
    assert any("resuming" in line and "step 2" in line for line in logs)
    assert ("vae", 1) not in steps and sum(n for p, n in steps if p == "unet") == TINY.unet_steps
    got, want = _weights(resumed), _weights(whole)
    assert set(got) == set(want) and len(want) == 3  # unet, text_encoder, vae
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    assert not partial.exists() and not (resumed / CHECKPOINT).exists()
