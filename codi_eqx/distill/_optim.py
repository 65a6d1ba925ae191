"""The optimiser: global-norm clipping, then AdamW on a learning-rate schedule."""

from __future__ import annotations

import optax

from ._config import OptimConfig


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """The learning rate as a function of the optimiser step."""
    lr, warm, total = cfg.learning_rate, cfg.lr_warmup_steps, max(cfg.max_train_steps, 1)
    if cfg.lr_scheduler == "constant":
        return optax.constant_schedule(lr)
    warmup = optax.linear_schedule(0.0, lr, warm) if warm > 0 else optax.constant_schedule(lr)
    if cfg.lr_scheduler == "constant_with_warmup":
        rest = optax.constant_schedule(lr)
    elif cfg.lr_scheduler == "linear":
        rest = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
    else:
        rest = optax.cosine_decay_schedule(lr, max(total - warm, 1))
    return optax.join_schedules([warmup, rest], [warm])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm (when `max_grad_norm` is set), then AdamW."""
    adamw = optax.adamw(
        lr_schedule(cfg), b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
        weight_decay=cfg.adam_weight_decay,
    )
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
