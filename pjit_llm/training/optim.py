"""The optimizer: warm-up then cosine (or constant) AdamW with global-norm clipping.

Weight decay applies only to matrices: a parameter with fewer than two logical axes besides
`layers` (norm scales, biases) is not decayed.
"""

import jax
import optax
from flax import nnx

from pjit_llm.config import OptimizerConfig
from pjit_llm.errors import UserError


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    if cfg.warmup_steps >= total_steps:
        raise UserError(f"optimizer.warmup_steps={cfg.warmup_steps} must be smaller than "
                        f"train.steps={total_steps}")
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=total_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    def matrix(v: nnx.Variable) -> nnx.Variable:
        return v.replace(sum(a != "layers" for a in v.logical_axes) >= 2)

    return jax.tree.map(matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    # The chain keeps one state layout whether or not clipping is on, so a checkpoint
    # resumes under a changed clip_norm.
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)
