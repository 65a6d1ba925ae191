"""The compiled training step and sampler step hand every convolution to XLA:CPU's library
(none loop-emitted, none inside a `while` loop), and the loop-free forms compute what the
`lax.scan` forms compute."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import UNET, perturb, tiny_models

from codi_eqx import distill
from codi_eqx._hlo import convolutions, slow_convolutions
from codi_eqx.models import ControlNetModel
from codi_eqx.parallel import make_mesh, replicate, shard_batch
from codi_eqx.sampling import codi_sample
from codi_eqx.sampling._generate import StepSpec, sampler_step_batch

# 8x8 latents: at 4x4 the tiny UNet's lowest level is 2x2, where XLA picks another layout
# for a few weight gradients whatever the loop structure.
L = 8


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latent_mean": rng.standard_normal((n, 4, L, L)).astype(np.float32),
        "latent_logvar": rng.uniform(-4, -1, (n, 4, L, L)).astype(np.float32),
        "scaling_factor": np.full((n,), 0.18215, np.float32),
        "text_embeddings": rng.standard_normal((n, 8, UNET.cross_attention_dim[0])).astype(np.float32),
        "conditioning_pixel_values": rng.uniform(0, 1, (n, 3, 8 * L, 8 * L)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def setup():
    unet, _, _, sched = tiny_models()
    adapter = perturb(ControlNetModel.from_unet(unet, key=jax.random.key(1)), jax.random.key(5), 0.02)
    null = jax.random.normal(jax.random.key(9), (8, UNET.cross_attention_dim[0]))
    mesh = make_mesh(jax.devices()[:1])
    frozen = replicate(distill.make_frozen(unet, None, None, sched, null_embedding=null), mesh)
    ocfg = distill.OptimConfig(learning_rate=1e-3)
    tx = distill.make_optimizer(ocfg)
    return unet, adapter, sched, mesh, frozen, ocfg, tx


def _state(setup):
    _, adapter, _, mesh, _, _, tx = setup
    return replicate(distill.init_train_state(distill.Trainable(adapter), tx, key=jax.random.key(2)), mesh)


def _step(setup, accum, loop, cfg_aware=True):
    _, _, _, mesh, _, ocfg, _ = setup
    return distill.make_train_step(
        distill.DistillConfig(cfg_aware_distill=cfg_aware), mesh, gradient_accumulation_steps=accum,
        lr_fn=distill.lr_schedule(ocfg), accumulation_loop=loop,
    )


def _lower(setup, accum, loop, batch, cfg_aware=True):
    _, _, _, mesh, frozen, _, _ = setup
    batch = shard_batch(batch, mesh)
    return _step(setup, accum, loop, cfg_aware).lower(frozen, _state(setup), batch), batch


def _compile(setup, accum, loop, batch):
    _, _, _, mesh, frozen, _, _ = setup
    lowered, batch = _lower(setup, accum, loop, batch)
    compiled = lowered.compile()
    run = lambda: compiled((frozen, batch), _state(setup))  # noqa: E731
    return compiled.compiled.as_text(), run


@pytest.fixture(scope="module")
def one_step(setup):
    """The step with one micro-batch, the default options (unguided: half the passes of the
    accumulation tests' guidance-aware step): (lowered, optimised HLO, state, batch)."""
    lowered, batch = _lower(setup, 1, "unrolled", _batch(2), cfg_aware=False)
    return lowered, lowered.compile().compiled.as_text(), _state(setup), batch


def test_step_donates_the_state_only(one_step):
    """The state's buffers are recycled; the frozen weights and the batch stay valid, so a
    caller may reuse a batch (XLA would otherwise take a batch buffer for any output of the
    same shape, as it does for SD1.5-sized steps)."""
    lowered, _, state, batch = one_step
    [main] = [line for line in lowered.as_text().splitlines() if "func.func public @main" in line]
    args = re.findall(r"%arg\d+: [^%]*", main)
    donated = [a for a in args if "buffer_donor" in a or "aliasing_output" in a]
    n_state = len([x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)])
    assert len(donated) == n_state
    batch_args = [a for a in args if '"data"' in a]  # the inputs split over the mesh
    assert len(batch_args) == len(batch)
    assert not any(a in donated for a in batch_args), "a batch input is donated"


def test_train_step_has_no_slow_convolution(one_step):
    hlo = one_step[1]
    convs = convolutions(hlo)
    assert len(convs) > 100  # teacher, target, online passes and the backward
    slow = slow_convolutions(hlo)
    assert not slow, f"{len(slow)} of {len(convs)} convolutions loop-emitted, e.g. {slow[:3]}"


@pytest.fixture(scope="module")
def accumulated(setup):
    """The step with 2 micro-batches, unrolled and in a lax.scan: (HLO, state, metrics)."""
    out = {}
    for loop in ("unrolled", "scan"):
        hlo, run = _compile(setup, 2, loop, _batch(4, seed=3))
        state, metrics = run()
        out[loop] = (hlo, jax.tree.leaves(eqx.filter(state.params, eqx.is_inexact_array)),
                     {k: float(v) for k, v in metrics.items()})
    return out


@pytest.mark.slow
def test_unrolled_accumulation_has_no_slow_convolution(accumulated):
    hlo = accumulated["unrolled"][0]
    assert len(convolutions(hlo)) > 200
    assert not slow_convolutions(hlo)


@pytest.mark.slow
def test_scan_accumulation_is_detected_as_slow(accumulated):
    # The check can fail: the same step with the micro-batches in a lax.scan puts every
    # network convolution inside the while loop.
    convs = convolutions(accumulated["scan"][0])
    assert sum(c.in_loop for c in convs) > 100
    assert len([c for c in convs if c.slow_on_cpu]) > 100


@pytest.mark.slow
def test_unrolled_accumulation_equals_scan(accumulated):
    (_, p_u, m_u), (_, p_s, m_s) = accumulated["unrolled"], accumulated["scan"]
    for k in ("loss", "grad_norm", "loss_consistency"):
        assert abs(m_u[k] - m_s[k]) <= 1e-5 * abs(m_s[k]), (k, m_u[k], m_s[k])
    # Norm-wise: AdamW moves a component whose gradient is at float-noise level by ~lr
    # either way (as in tests/test_distill.py's devices/accumulation test).
    u = np.concatenate([np.ravel(a) for a in p_u])
    s = np.concatenate([np.ravel(a) for a in p_s])
    assert np.linalg.norm(u - s) <= 1e-5 * np.linalg.norm(s)


def test_auto_accumulation_unrolls_on_cpu():
    assert distill.accumulation_loop_for("cpu") == "unrolled"
    assert distill.accumulation_loop_for("gpu") == "scan"
    with pytest.raises(ValueError, match="accumulation_loop"):
        distill.make_train_step(distill.DistillConfig(), make_mesh(jax.devices()[:1]),
                                accumulation_loop="while")


@pytest.mark.parametrize("sampler,cfg", [("codi", False), ("ddim", True)])
def test_sampler_step_has_no_slow_convolution(setup, sampler, cfg):
    unet, adapter, sched, _, _, _, _ = setup
    b = 2
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    cond = jax.random.normal(k1, (b, 8, UNET.cross_attention_dim[0]))
    control = jax.random.uniform(k2, (b, 3, 8 * L, 8 * L))
    z = jax.random.normal(k3, (b, 4, L, L))
    args = (unet, adapter, sched, StepSpec(sampler, cfg, 10.0), cond, cond, control, z,
            jnp.asarray(500, jnp.int32), jnp.asarray(250, jnp.int32), jnp.asarray(False),
            jnp.asarray(3.0, jnp.float32), jnp.asarray(1.0, jnp.float32))
    hlo = sampler_step_batch.lower(*args).compile().compiled.as_text()
    convs = convolutions(hlo)
    assert len(convs) > 30
    assert not slow_convolutions(hlo)


@pytest.mark.slow
def test_unrolled_sampler_has_no_slow_convolution_and_scan_does(setup):
    unet, _, sched, _, _, _, _ = setup
    cond = jax.random.normal(jax.random.key(1), (8, UNET.cross_attention_dim[0]))
    z = jax.random.normal(jax.random.key(2), (4, L, L))

    def run(ts):
        return codi_sample(lambda x, t: unet(x, t, cond), sched, z, ts)[0]

    unrolled = eqx.filter_jit(run).lower((980, 720, 460, 200)).compile().compiled.as_text()
    scanned = eqx.filter_jit(run).lower(np.asarray([980, 720, 460, 200], np.int32)).compile()
    assert not slow_convolutions(unrolled)
    assert all(c.in_loop for c in convolutions(scanned.compiled.as_text()))
    np.testing.assert_allclose(
        np.asarray(eqx.filter_jit(run)((980, 720, 460, 200))),
        np.asarray(scanned(np.asarray([980, 720, 460, 200], np.int32))), rtol=0, atol=1e-5)
