"""The training objective: next-token cross-entropy in float32 over the tokens whose
successor belongs to the same segment (padding and document ends are masked out) and, when
the batch carries a `loss_mask` (chat and prompt/completion data), is a target the mask keeps.
The train step differentiates it, plus a mixture of experts' router losses
(`objective_terms`); the eval step (held-out loss) sums it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pjit_llm.models.moe import router_loss, router_metrics
from pjit_llm.parallel.context import balanced_order
from pjit_llm.parallel.layout import constrain

Batch = dict[str, jax.Array]


def loss_terms(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, balance: int = 0):
    """(sum of token losses, number of predicted tokens), both float32."""
    return _terms(graphdef, params, batch, balance)[:2]


def objective_terms(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, balance: int = 0):
    """What the train step differentiates: (sum of token losses plus, for a mixture of
    experts, the router losses (coefficients from the config) times the number of predicted
    tokens, so that the step's division by that number adds them once; (number of predicted
    tokens, sum of token losses, the router's metrics: models/moe.py `router_metrics`))."""
    loss_sum, count, stats, cfg, real = _terms(graphdef, params, batch, balance)
    metrics = router_metrics(cfg, stats, real)
    return loss_sum + count * router_loss(cfg, metrics), (count, loss_sum, metrics)


def _terms(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, balance: int = 0):
    """(sum of token losses, number of predicted tokens, the layers' statistics, the model
    config, number of real tokens).

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
            constrain(model.layout, x[:, order_L], ("batch", "length"))
            for x in (tokens, seg, positions, targets_BL, weights_BL))
        slots_BL = constrain(model.layout, slots_BL, ("batch", "length"))
    x_BLD, stats = model.hidden_and_stats(tokens, seg, positions, slots_BL)
    real = jnp.sum(seg > 0).astype(jnp.float32)
    cfg = model.cfg

    w_VD = model.output_weights()

    def chunk_loss(x_BcD, targets_Bc, weights_Bc):
        logits_BcV = model.project(x_BcD, w_VD).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits_BcV, axis=-1) - target_logit) * weights_Bc)

    B, L, D = x_BLD.shape
    chunk = model.cfg.loss_chunk
    if not chunk or chunk >= L:
        return chunk_loss(x_BLD, targets_BL, weights_BL), jnp.sum(weights_BL), stats, cfg, real

    def to_chunks(x, axes):  # (B, L, ...) -> (L/chunk, B, chunk, ...), chunks leading
        x = jnp.swapaxes(x.reshape(B, L // chunk, chunk, *x.shape[2:]), 0, 1)
        return x if model.layout is None else model.layout.constrain(x, (None, *axes))

    def body(total, xs):
        return total + jax.checkpoint(chunk_loss)(*xs), None

    loss_sum, _ = jax.lax.scan(body, jnp.float32(0), (
        to_chunks(x_BLD, ("batch", "length", "embed")), to_chunks(targets_BL, ("batch", "length")),
        to_chunks(weights_BL, ("batch", "length"))))
    return loss_sum, jnp.sum(weights_BL), stats, cfg, real


def make_eval_step(graphdef, balance: int = 0) -> Callable:
    """(params, batch) -> {"loss_sum", "tokens"}: the sums the held-out loss divides."""
    def eval_step(params: nnx.State, batch: Batch):
        loss_sum, count = loss_terms(graphdef, params, batch, balance)
        return {"loss_sum": loss_sum, "tokens": count}
    return eval_step
