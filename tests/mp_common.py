"""The computation shared by the multi-process test and its single-process reference."""

import jax
import numpy as np

from codi_eqx import distill
from codi_eqx.models import ControlNetModel
from codi_eqx.parallel import make_mesh, replicate, shard_batch
from jax_tiny import UNET, perturb, tiny_models


def global_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latent_mean": rng.standard_normal((n, 4, 4, 4)).astype(np.float32),
        "latent_logvar": rng.uniform(-4, -1, (n, 4, 4, 4)).astype(np.float32),
        "scaling_factor": np.full((n,), 0.18215, np.float32),
        "text_embeddings": rng.standard_normal((n, 8, UNET.cross_attention_dim[0])).astype(np.float32),
        "conditioning_pixel_values": rng.uniform(0, 1, (n, 3, 32, 32)).astype(np.float32),
    }


def run_two_steps(share=None):
    """Two steps on the global batch of 4; `share=(start, stop)` is this process's slice."""
    unet, _, _, sched = tiny_models()
    adapter = perturb(ControlNetModel.from_unet(unet, key=jax.random.key(1)), jax.random.key(5), 0.02)
    null = jax.random.normal(jax.random.key(9), (8, UNET.cross_attention_dim[0]))
    frozen = distill.make_frozen(unet, None, None, sched, null_embedding=null)
    ocfg = distill.OptimConfig(learning_rate=1e-3)
    mesh = make_mesh()
    state = replicate(distill.init_train_state(distill.Trainable(adapter), distill.make_optimizer(ocfg),
                                               key=jax.random.key(2)), mesh)
    frozen = replicate(frozen, mesh)
    step = distill.make_train_step(distill.DistillConfig(), mesh, lr_fn=distill.lr_schedule(ocfg))
    out = []
    for i in range(2):
        batch = global_batch(seed=i)
        if share is not None:
            batch = {k: v[share[0]:share[1]] for k, v in batch.items()}
        state, metrics = step(frozen, state, shard_batch(batch, mesh))
        out.append({k: float(v) for k, v in metrics.items()})
    return out
