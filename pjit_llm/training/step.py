"""Training state, its shardings, and the pure train step: plan_state, train_step.

No I/O and no host syncs here. The loss they take is models/loss.py's.
"""

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pjit_llm.models.fp8_state import split_histories
from pjit_llm.models.loss import Batch, objective_terms
from pjit_llm.parallel.layout import Layout, is_variable, param_shardings
from pjit_llm.parallel.stages import split_microbatches


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # the model's state: its parameters and any fp8 amax histories
    opt_state: optax.OptState  # of the parameters alone


def trainable(params: nnx.State) -> nnx.State:
    """What the optimizer updates: the model's state without its fp8 amax histories, which
    each step overwrites instead (models/fp8_state.py)."""
    return split_histories(params)[0]


def state_shardings(layout: Layout, tx: optax.GradientTransformation, abstract_params):
    """Parameters and their optimizer moments share the rule table's shardings."""
    params = param_shardings(layout, abstract_params)
    opt_state = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, trainable(abstract_params)), trainable(params),
        transform_non_params=lambda _: layout.replicated(),
        is_leaf=is_variable)
    return TrainState(step=layout.replicated(), params=params, opt_state=opt_state)


def plan_state(abstract_params: nnx.State, layout: Layout, tx: optax.GradientTransformation):
    """(abstract state, shardings) of the parameters and their optimizer state: shapes,
    dtypes and layout, nothing allocated. The abstract state's leaves carry their shardings,
    so it is also the target for restoring a checkpoint straight into this mesh."""
    shardings = state_shardings(layout, tx, abstract_params)
    shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                 opt_state=tx.init(trainable(p))),
                            abstract_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return abstract, shardings


def _micro_batches(batch: Batch, k: int, layout: Layout) -> Batch:
    """(B, L) -> (k, B/k, L), micro-batch j holding rows j, j+k, ... so that every device keeps
    its own rows and splitting moves no data."""
    return jax.tree.map(
        lambda x: layout.constrain(split_microbatches(x, k), (None, "batch", "length")), batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int, layout: Layout, skip_nonfinite: bool = False,
                    balance: int = 0) -> Callable:
    """The training step. With `skip_nonfinite`, a step whose loss or gradient norm is not
    finite leaves parameters and optimizer state as they were (the step still counts).
    `balance`: the context shards the rows are reordered for (0: none).

    The optimizer sees the parameters alone. fp8 amax histories (model.fp8_scaling=delayed)
    are differentiated too: their gradients are their next values, combined by max over
    every use in the step (pipeline and accumulation micro-batches), and replace them; they
    take no part in clipping, weight decay or the gradient norm (models/fp8_state.py).

    A mixture of experts adds its router losses to the objective; `loss` stays the
    cross-entropy, and the router's metrics (moe_aux_loss, router_z_loss, expert_tokens_max,
    expert_tokens_mean: models/moe.py) are logged beside it, averaged over accumulated
    micro-batches by their token counts."""
    def loss(weights, histories, batch):
        return objective_terms(graphdef, nnx.merge_state(weights, histories), batch, balance)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        weights, histories = split_histories(state.params)
        if grad_accum == 1:
            (_, (count, loss_sum, router)), (grads, histories) = grad_fn(weights, histories, batch)
        else:
            def accumulate(carry, micro):
                (_, (c, l, r)), (g, h) = grad_fn(weights, histories, micro)
                acc_l, acc_c, acc_r, acc_g, acc_h = carry
                return (acc_l + l, acc_c + c, jax.tree.map(lambda a, b: a + b * c, acc_r, r),
                        jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g),
                        jax.tree.map(jnp.maximum, acc_h, h)), None  # amaxes: max, not sum

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (weights, histories))
            first = jax.tree.map(lambda x: x[0], _micro_batches(batch, grad_accum, layout))
            router_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                                        jax.eval_shape(loss, weights, histories, first)[1][2])
            (loss_sum, count, router, grads, histories), _ = jax.lax.scan(
                accumulate, (jnp.float32(0), jnp.float32(0), router_zeros, *zeros),
                _micro_batches(batch, grad_accum, layout))
            router = jax.tree.map(lambda r: r / jnp.maximum(count, 1.0), router)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, weights)
        updates, opt_state = tx.update(grads, state.opt_state, weights)
        params = nnx.merge_state(optax.apply_updates(weights, updates), histories)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "tokens": count, **router}
        if "truncated" in batch:  # records in the batch, and those cut at the row length
            metrics["records"] = jnp.sum((batch["positions"] == 0) & (batch["segment_ids"] > 0))
            metrics["truncated"] = jnp.sum(batch["truncated"])
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def compile_train_step(graphdef, tx, schedule, grad_accum: int, layout: Layout,
                       shardings: TrainState, skip_nonfinite: bool = False, balance: int = 0):
    """jit the train step once with explicit shardings; it donates its state."""
    return jax.jit(make_train_step(graphdef, tx, schedule, grad_accum, layout, skip_nonfinite,
                                   balance),
                   in_shardings=(shardings, layout.sharding(("batch", "length"))),
                   out_shardings=(shardings, layout.replicated()), donate_argnums=0)
