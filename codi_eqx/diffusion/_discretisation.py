"""CoDi's timestep discretisation: training draws `(t, s)` and the few-step sampling grid.

With `N` distillation steps and `k = T // N`, training uses the grid `{0, k, ..., (N-1) k}`:
`n` is drawn uniformly in `{0, ..., N-1}`, `t = n k` and `s = max(n - 1, 0) k`.
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray


def _step_size(num_train_timesteps: int, distill_learning_steps: int) -> int:
    if not 1 <= distill_learning_steps <= num_train_timesteps:
        raise ValueError(
            f"distill_learning_steps must lie in [1, {num_train_timesteps}] (the number of "
            f"training timesteps), got {distill_learning_steps}"
        )
    return num_train_timesteps // distill_learning_steps


def distill_timestep(
    key: PRNGKeyArray, num_train_timesteps: int, distill_learning_steps: int
) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """Draw one example's pair of adjacent timesteps `(t, s)`.

    **Arguments:**

    - `key`: this example's PRNG key.
    - `num_train_timesteps`: `T`.
    - `distill_learning_steps`: `N`; `k = T // N`.

    **Returns:** `(t, s)` int32 scalars, `t = n k`, `s = max(n - 1, 0) k`, `n ~ U{0..N-1}`.
    """
    k = _step_size(num_train_timesteps, distill_learning_steps)
    n = jax.random.randint(key, (), 0, distill_learning_steps, dtype=jnp.int32)
    return n * k, jnp.maximum(n - 1, 0) * k


def distill_timesteps(
    key: PRNGKeyArray,
    batch_size: int,
    num_train_timesteps: int,
    distill_learning_steps: int,
    shared: bool = False,
) -> tuple[Int[Array, " batch"], Int[Array, " batch"]]:
    """Draw `(t, s)` for a batch: one `n` per example, or one `n` for the whole batch.

    Per example, example `i` draws with the `i`-th key of `jax.random.split(key, batch_size)`,
    i.e. exactly what `distill_timestep` gives for that key.

    **Arguments:**

    - `key`: PRNG key.
    - `batch_size`: `B`.
    - `num_train_timesteps`: `T`.
    - `distill_learning_steps`: `N`.
    - `shared`: draw a single `n` shared by the batch (reported better for 1-4-step sampling).

    **Returns:** `(t, s)`, int32 arrays of shape `(B,)`.
    """
    if shared:
        t, s = distill_timestep(key, num_train_timesteps, distill_learning_steps)
        shape = (batch_size,)
        return jnp.broadcast_to(t, shape), jnp.broadcast_to(s, shape)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(
        lambda k: distill_timestep(k, num_train_timesteps, distill_learning_steps)
    )(keys)


def codi_sampling_timesteps(
    num_train_timesteps: int, distill_learning_steps: int, steps: int
) -> list[int]:
    """The timesteps of CoDi's few-step sampler, descending.

    From the grid `[(N-1) k, ..., k, 0]` take every `r`-th point, `r = ceil(N / steps)`; if
    that gives fewer than `steps` points, take every `(N // steps)`-th and keep `steps` of them.

    **Arguments:**

    - `num_train_timesteps`: `T`.
    - `distill_learning_steps`: `N` used in training; `k = T // N`.
    - `steps`: number of sampling steps, in `[1, N]`.

    **Returns:** `steps` Python ints, e.g. `T=1000, N=50, steps=4 -> [980, 720, 460, 200]`.
    """
    k = _step_size(num_train_timesteps, distill_learning_steps)
    n = distill_learning_steps
    if not 1 <= steps <= n:
        raise ValueError(
            f"steps must lie in [1, {n}] (the distillation grid has distill_learning_steps={n} "
            f"points), got {steps}"
        )
    grid = [i * k for i in range(n - 1, -1, -1)]
    ts = grid[:: math.ceil(n / steps)]
    if len(ts) < steps:
        ts = grid[:: n // steps][:steps]
    return ts
