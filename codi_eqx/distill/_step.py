"""The compiled CoDi training step: data-parallel with `shard_map`, gradient accumulation
inside, optimiser and EMA updates after."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from ..parallel import DATA
from ._config import DistillConfig
from ._loss import example_loss
from ._state import Frozen, TrainState

METRIC_NAMES = ("loss", "loss_consistency", "loss_regularizer", "timestep", "guidance_scale")
"""The step's metrics (besides `grad_norm` and `lr`) for CoDi's objective."""
DIFFUSION_METRIC_NAMES = ("loss", "timestep")
"""The step's metrics (besides `grad_norm` and `lr`) for the `controlnet` objective."""


def metric_names(cfg: DistillConfig) -> tuple[str, ...]:
    """The metrics the step returns for `cfg`'s objective, besides `grad_norm` and `lr`."""
    return DIFFUSION_METRIC_NAMES if cfg.objective == "controlnet" else METRIC_NAMES


def ema_update(ema, params, decay: Union[float, Float[Array, ""]]):
    """theta_minus <- decay * theta_minus + (1 - decay) * theta, on the inexact arrays (the
    training step's EMA, and the toy teacher pretraining's)."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype) if eqx.is_inexact_array(e) else e,
        ema, params,
    )


def latent_shape_of(frozen: Frozen, batch: dict) -> tuple[int, int, int]:
    """The latent shape of one example of `batch` (static)."""
    if "latent_mean" in batch:
        return tuple(batch["latent_mean"].shape[1:])
    factor = frozen.vae.config.downsample_factor
    _, _, h, w = batch["pixel_values"].shape
    return (frozen.vae.config.latent_channels, h // factor, w // factor)


ACCUMULATION_LOOPS = ("auto", "unrolled", "scan")


def accumulation_loop_for(platform: str) -> str:
    """How micro-batches are looped over on a backend: `"unrolled"` (a traced Python loop) or
    `"scan"` (one `lax.scan`).

    XLA:CPU does not call its library convolution for convolutions inside a `while` loop (it
    loop-emits them, 10-100x slower), so on CPU the loop is unrolled; elsewhere the
    convolutions are library calls either way and `scan` compiles one body instead of k.
    """
    return "unrolled" if platform == "cpu" else "scan"


def make_train_step(
    cfg: DistillConfig, mesh: Mesh, *, gradient_accumulation_steps: int = 1,
    ema_decay: float = 0.999, lr_fn: Callable | None = None, accumulation_loop: str = "auto",
):
    """Build `train_step(frozen, state, batch) -> (state, metrics)`.

    `batch` is the global batch (a dict of arrays with a leading batch axis: `pixel_values`
    or `latent_mean` + `latent_logvar` + `scaling_factor`, `input_ids` or `text_embeddings`,
    and `conditioning_pixel_values` for conditional distillation). It is split over the
    mesh's `data` axis, and each device's share into `gradient_accumulation_steps`
    micro-batches. Each example draws its randomness from the step key folded with its
    global position, so N devices, or k micro-batches, compute what one device computes on
    the whole batch (up to float summation order). The state is donated; `frozen` and the
    batch are not.

    `accumulation_loop` chooses how the micro-batches are looped over: `"auto"` (the
    default) picks per backend with `accumulation_loop_for`; `"unrolled"` traces one copy of
    the loss and gradient per micro-batch; `"scan"` one `lax.scan` body. A single micro-batch
    is never wrapped in a loop. Both give the same result.

    The returned function counts its compilations in `.num_traces`.
    """
    k = gradient_accumulation_steps
    if k < 1:
        raise ValueError("gradient_accumulation_steps must be at least 1")
    if accumulation_loop not in ACCUMULATION_LOOPS:
        raise ValueError(
            f"accumulation_loop must be one of {', '.join(ACCUMULATION_LOOPS)}, "
            f"got {accumulation_loop!r}"
        )
    if accumulation_loop == "auto":
        accumulation_loop = accumulation_loop_for(mesh.devices.flat[0].platform)
    traces = [0]

    def step(frozen: Frozen, state: TrainState, batch: dict):
        traces[0] += 1
        n_devices = mesh.devices.size
        global_n = next(iter(batch.values())).shape[0]
        if global_n % (n_devices * k):
            raise ValueError(
                f"global batch {global_n} does not split into {n_devices} devices x {k} "
                "accumulation steps"
            )
        shape = latent_shape_of(frozen, batch)
        step_key, batch_key = jax.random.split(jax.random.fold_in(state.key, state.step))
        p_dyn, p_static = eqx.partition(state.params, eqx.is_inexact_array)
        e_dyn, e_static = eqx.partition(state.ema, eqx.is_array)
        f_dyn, f_static = eqx.partition(frozen, eqx.is_array)

        def local(p_dyn, e_dyn, f_dyn, batch, step_key, batch_key):
            ema = eqx.combine(e_dyn, e_static)
            frz = eqx.combine(f_dyn, f_static)
            n_local = next(iter(batch.values())).shape[0]
            positions = jax.lax.axis_index(DATA) * n_local + jnp.arange(n_local)
            micro = jax.tree.map(lambda a: a.reshape(k, n_local // k, *a.shape[1:]), batch)
            micro_pos = positions.reshape(k, n_local // k)

            def total(p, mb, pos):
                params = eqx.combine(p, p_static)
                losses, aux = jax.vmap(
                    lambda ex, i: example_loss(
                        params, ema, frz, ex, jax.random.fold_in(step_key, i), batch_key, cfg, shape
                    )
                )(mb, pos)
                aux = {name: jnp.sum(v) / global_n for name, v in aux.items()}
                return jnp.sum(losses) / global_n, aux

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, pos = xs
                (loss, aux), g = jax.value_and_grad(total, has_aux=True)(p_dyn, mb, pos)
                m = {"loss": loss, **aux}
                return (
                    jax.tree.map(jnp.add, g_acc, g),
                    jax.tree.map(jnp.add, m_acc, m),
                ), None

            g0 = jax.tree.map(jnp.zeros_like, p_dyn)
            m0 = {
                name: jax.lax.pcast(jnp.zeros((), jnp.float32), (DATA,), to="varying")
                for name in metric_names(cfg)
            }
            if accumulation_loop == "scan" and k > 1:
                (grads, metrics), _ = jax.lax.scan(body, (g0, m0), (micro, micro_pos))
            else:
                carry = (g0, m0)
                for i in range(k):
                    xs = jax.tree.map(lambda a, i=i: a[i], (micro, micro_pos))
                    carry, _ = body(carry, xs)
                grads, metrics = carry
            # The gradient with respect to the replicated parameters already comes summed
            # over the mesh (the transpose of their implicit broadcast); the metrics do not.
            metrics = jax.tree.map(lambda m: jax.lax.psum(m, DATA), metrics)
            return grads, metrics

        grads, metrics = jax.shard_map(
            local, mesh=mesh,
            in_specs=(P(), P(), P(), P(DATA), P(), P()),
            out_specs=(P(), P()),
        )(p_dyn, e_dyn, f_dyn, batch, step_key, batch_key)

        grad_norm = optax.global_norm(grads)
        # optax mixes Python floats and int32 step counts internally.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = state.tx.update(grads, state.opt_state, p_dyn)
            lr = (
                jnp.asarray(lr_fn(state.step), jnp.float32) if lr_fn is not None
                else jnp.zeros((), jnp.float32)
            )
        params = eqx.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, ema_decay)
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = lr
        new_state = TrainState(
            step=state.step + 1, params=params, ema=ema, opt_state=opt_state, key=state.key,
            tx=state.tx,
        )
        return new_state, metrics

    # Only the state is donated: the frozen weights and the batch stay valid for the caller
    # (a batch may be reused, e.g. for evaluation; XLA would otherwise recycle its buffers
    # whenever an output has a matching shape).
    jitted = eqx.filter_jit(
        lambda kept, state: step(kept[0], state, kept[1]), donate="all-except-first")

    def train_step(frozen: Frozen, state: TrainState, batch: dict):
        return jitted((frozen, batch), state)

    train_step.num_traces = lambda: traces[0]  # type: ignore[attr-defined]
    train_step.lower = lambda frozen, state, batch: jitted.lower((frozen, batch), state)  # type: ignore[attr-defined]
    return train_step
