"""The optimizer: warm-up then cosine (or constant) AdamW with global-norm clipping.

Weight decay applies only to matrices: a parameter with fewer than two logical axes besides
`layers` (norm scales, biases) is not decayed.
"""

import dataclasses

import jax
import optax
from flax import nnx

from pjit_llm.config import OptimizerConfig
from pjit_llm.parallel.layout import is_variable


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Warm-up then cosine (or constant) over the span the config sets (see OptimizerConfig);
    with optimizer.schedule_start, the steps before it follow a schedule spanning just them."""
    start, span = cfg.schedule_start, cfg.span(total_steps)
    if not start:
        return _warmup_then_decay(cfg, span)
    before = dataclasses.replace(cfg, schedule_start=0, decay_steps=0)
    return optax.join_schedules([_warmup_then_decay(before, start),
                                 _warmup_then_decay(cfg, span)], [start])


def _warmup_then_decay(cfg: OptimizerConfig, span: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, span - 1)
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
            [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=span, end_value=cfg.lr * cfg.min_lr_ratio)


def schedule_change(saved: OptimizerConfig, saved_steps: int, cfg: OptimizerConfig,
                    total_steps: int, step: int) -> str | None:
    """A line saying how the learning rate moves at `step` when a run resumes under a
    schedule other than the one it was trained with (None when the rate is unchanged), with
    the two usual choices when only train.steps changed."""
    before = float(make_schedule(saved, saved_steps)(step))
    after = float(make_schedule(cfg, total_steps)(step))
    if abs(after - before) <= 1e-6 * max(abs(before), abs(after)):
        return None
    line = (f"the learning rate at step {step} changes from {before:.2e} to {after:.2e}: the "
            f"schedule now ends at step {_end(cfg, total_steps)} (it ended at "
            f"{_end(saved, saved_steps)})")
    if saved != cfg:  # the user chose the new schedule
        return line
    return (f"{line}; to continue the old schedule's tail instead, set optimizer.decay_steps="
            f"{_end(saved, saved_steps) - saved.schedule_start}, or for a new warm-up and decay "
            f"over the added steps, optimizer.schedule_start={step}")


def _end(cfg: OptimizerConfig, total_steps: int) -> int:
    return cfg.schedule_start + cfg.decay_steps if cfg.decay_steps else total_steps


def decay_mask(params):
    def matrix(v: nnx.Variable) -> nnx.Variable:
        return v.replace(sum(a != "layers" for a in v.logical_axes) >= 2)

    return jax.tree.map(matrix, params, is_leaf=is_variable)


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    # The chain keeps one state layout whether or not clipping is on, so a checkpoint
    # resumes under a changed clip_norm.
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)
