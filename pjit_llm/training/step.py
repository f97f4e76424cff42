"""Training state, its shardings, and the pure steps: init_state, train_step, eval_step.

No I/O and no host syncs here. The loss is next-token cross-entropy in float32 over tokens
whose successor belongs to the same segment (padding and document ends are masked out) and,
when the batch carries a `loss_mask` (chat and prompt/completion data), is a target the mask
keeps (assistant turns, completions).
"""

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pjit_llm.models.llama.config import ModelConfig
from pjit_llm.models.llama.model import Transformer, abstract_model
from pjit_llm.parallel.context import balanced_order
from pjit_llm.parallel.layout import Layout, check_divisible, param_shardings
from pjit_llm.parallel.stages import Pipeline, split_microbatches

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def state_shardings(layout: Layout, tx: optax.GradientTransformation, abstract_params):
    """Parameters and their optimizer moments share the rule table's shardings."""
    params = param_shardings(layout, abstract_params)
    opt_state = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), params,
        transform_non_params=lambda _: layout.replicated(),
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return TrainState(step=layout.replicated(), params=params, opt_state=opt_state)


def plan_state(cfg: ModelConfig, layout: Layout, tx: optax.GradientTransformation,
               pipeline: Pipeline | None = None):
    """(graphdef, abstract state, shardings): shapes, dtypes and layout, nothing allocated.

    The abstract state's leaves carry their shardings, so it is also the target for
    restoring a checkpoint straight into this mesh."""
    graphdef, abstract_params = abstract_model(cfg, layout, pipeline)
    check_divisible(layout, abstract_params)
    shardings = state_shardings(layout, tx, abstract_params)
    shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                 opt_state=tx.init(p)), abstract_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return graphdef, abstract, shardings


def init_state(cfg: ModelConfig, layout: Layout, tx: optax.GradientTransformation, seed: int,
               pipeline: Pipeline | None = None):
    """Create parameters and optimizer state directly in their shardings (no full host copy).
    The same seed gives the same model on every mesh and pipeline schedule.

    Returns (graphdef, state, shardings).
    """
    graphdef, _, shardings = plan_state(cfg, layout, tx, pipeline)

    def init(key):
        params = nnx.split(Transformer(cfg, layout, nnx.Rngs(params=key), pipeline))[1]
        if pipeline is not None:
            params = pipeline.to_stage_order(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return graphdef, state, shardings


def loss_terms(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, balance: int = 0):
    """(sum of token losses, number of predicted tokens), both float32.

    Position i predicts token i+1 when both lie in the same segment and, with a `loss_mask`,
    the mask keeps token i+1. With model.loss_chunk the
    vocabulary projection and the loss run over chunks of positions under a rematerialised
    scan, so float32 logits exist for one chunk at a time, forward and backward. With
    `balance` (context shards), the rows are reordered for load balance (parallel/context.py)
    once targets and weights are known; the sums do not depend on the order."""
    model = nnx.merge(graphdef, params)
    tokens, seg, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    last = ((0, 0), (0, 1))  # the last position predicts nothing
    targets_BL = jnp.pad(tokens[:, 1:], last)
    keep_BL = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    if "loss_mask" in batch:
        keep_BL &= batch["loss_mask"][:, 1:] > 0
    weights_BL = jnp.pad(keep_BL, last).astype(jnp.float32)
    slots_BL = None
    if balance:
        order_L = balanced_order(tokens.shape[1], balance)
        slots_BL = jnp.broadcast_to(jnp.asarray(order_L), tokens.shape)
        tokens, seg, positions, targets_BL, weights_BL = (
            _constrain(model.layout, x[:, order_L], ("batch", "length"))
            for x in (tokens, seg, positions, targets_BL, weights_BL))
        slots_BL = _constrain(model.layout, slots_BL, ("batch", "length"))
    x_BLD = model.hidden(tokens, seg, positions, slots_BL)

    w_VD = model.output_weights()

    def chunk_loss(x_BcD, targets_Bc, weights_Bc):
        logits_BcV = model.project(x_BcD, w_VD).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits_BcV, axis=-1) - target_logit) * weights_Bc)

    B, L, D = x_BLD.shape
    chunk = model.cfg.loss_chunk
    if not chunk or chunk >= L:
        return chunk_loss(x_BLD, targets_BL, weights_BL), jnp.sum(weights_BL)

    def to_chunks(x, axes):  # (B, L, ...) -> (L/chunk, B, chunk, ...), chunks leading
        x = jnp.swapaxes(x.reshape(B, L // chunk, chunk, *x.shape[2:]), 0, 1)
        return x if model.layout is None else model.layout.constrain(x, (None, *axes))

    def body(total, xs):
        return total + jax.checkpoint(chunk_loss)(*xs), None

    loss_sum, _ = jax.lax.scan(body, jnp.float32(0), (
        to_chunks(x_BLD, ("batch", "length", "embed")), to_chunks(targets_BL, ("batch", "length")),
        to_chunks(weights_BL, ("batch", "length"))))
    return loss_sum, jnp.sum(weights_BL)


def _constrain(layout: Layout | None, x: jax.Array, axes) -> jax.Array:
    return x if layout is None else layout.constrain(x, axes)


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
    `balance`: the context shards the rows are reordered for (0: none)."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_terms(graphdef, p, b, balance), has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch)
        else:
            def accumulate(carry, micro):
                (l, c), g = grad_fn(state.params, micro)
                acc_l, acc_c, acc_g = carry
                return (acc_l + l, acc_c + c,
                        jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (loss_sum, count, grads), _ = jax.lax.scan(
                accumulate, (jnp.float32(0), jnp.float32(0), zeros),
                _micro_batches(batch, grad_accum, layout))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "tokens": count}
        if "truncated" in batch:  # records in the batch, and those cut at the row length
            metrics["records"] = jnp.sum((batch["positions"] == 0) & (batch["segment_ids"] > 0))
            metrics["truncated"] = jnp.sum(batch["truncated"])
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef, balance: int = 0) -> Callable:
    def eval_step(params: nnx.State, batch: Batch):
        loss_sum, count = loss_terms(graphdef, params, batch, balance)
        return {"loss_sum": loss_sum, "tokens": count}
    return eval_step


def compile_steps(graphdef, tx, schedule, grad_accum: int, layout: Layout, shardings: TrainState,
                  skip_nonfinite: bool = False, balance: int = 0):
    """jit the steps once with explicit shardings; the train step donates its state."""
    batch_sharding = layout.sharding(("batch", "length"))
    train = jax.jit(make_train_step(graphdef, tx, schedule, grad_accum, layout, skip_nonfinite,
                                    balance),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, layout.replicated()), donate_argnums=0)
    evaluate = jax.jit(make_eval_step(graphdef, balance),
                       in_shardings=(shardings.params, batch_sharding),
                       out_shardings=layout.replicated())
    return train, evaluate
