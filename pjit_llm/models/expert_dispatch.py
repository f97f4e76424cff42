"""Where a mixture of experts' assignments go and how their outputs come back: each token's
k chosen experts, sorted or bucketed by expert, multiplied (models/expert_products.py) and
summed with the routing weights, on one batch shard or exchanged over the `expert` mesh axes.

Two modes (model.expert_capacity_factor):
- dropless (0, the default): the assignments sorted by expert, every group however large.
  With the experts split over mesh axes, every device of the expert group gathers the
  group's tokens and their routing (all-gather), computes the assignments of the experts it
  holds, and the partial outputs are summed back onto the tokens' own devices
  (reduce-scatter): exact, and it needs no ragged exchange, which XLA:CPU does not have.
- capacity (> 0): each expert takes at most C = ceil(factor x T x k / E) of a batch shard's
  T x k assignments, first choices before second ones, the rest dropped (their weight lost).
  The buckets (E, C, D) have a fixed size, so they travel by all-to-all to the devices that
  hold their experts and back, and multiply as one batched product.

Both return how many of each token's k assignments an expert computed, which the router's
metrics turn into the dropped share.
Shapes in names: T tokens, K chosen (k), S assignments (T x k), E experts, C capacity,
D embed, n devices of the expert group.
"""

import math

import jax
import jax.numpy as jnp

from pjit_llm.models.expert_products import batched_mlp, expert_count, grouped_mlp
from pjit_llm.models.target import target_backend


def expert_outputs(x_TD, experts_TK, weights_TK, expert_weights, cfg, group: tuple[str, ...]):
    """(output (T, D) in cfg.dtype, assignments computed per token (T,) float32).
    `expert_weights` (gate, up, down) hold this device's experts: all of them, or with the
    experts split over the mesh axes `group` (inside a shard_map over them), its share."""
    if cfg.expert_capacity_factor > 0:
        y_TD, served_T = _with_capacity(x_TD, experts_TK, weights_TK, expert_weights, cfg, group)
    elif group:
        y_TD, served_T = _dropless_exchanged(x_TD, experts_TK, weights_TK, expert_weights, cfg,
                                             group)
    else:
        y_TD, served_T = _dropless(x_TD, experts_TK, weights_TK, expert_weights, cfg, 0)
    return y_TD.astype(cfg.dtype), served_T


def _dropless(x_TD, experts_TK, weights_TK, expert_weights, cfg, first):
    """The assignments to experts first .. first + E_here - 1, sorted by expert and grouped
    (the others sorted after the groups and left out); (routing-weighted sum (T, D) float32,
    assignments computed per token)."""
    T, k = experts_TK.shape
    here = expert_count(expert_weights[0])
    local_S = experts_TK.reshape(T * k) - first
    key_S = jnp.where((local_S >= 0) & (local_S < here), local_S, here)
    order_S = jnp.argsort(key_S, stable=True)  # the assignment at each sorted place
    sizes_E = jnp.bincount(key_S, length=here).astype(jnp.int32)
    x_SD = jnp.take(x_TD, order_S // k, axis=0)
    y_SD = grouped_mlp(x_SD, sizes_E, *expert_weights, cfg.mlp_activation, cfg.dtype,
                       cfg.expert_matmul)
    place_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(T * k, dtype=order_S.dtype))
    y_TKD = jnp.take(y_SD, place_S, axis=0).reshape(T, k, -1)
    served_TK = (place_S < jnp.sum(sizes_E)).reshape(T, k).astype(jnp.float32)
    return jnp.einsum("TKD,TK->TD", y_TKD.astype(jnp.float32), weights_TK), served_TK.sum(-1)


def _dropless_exchanged(x_TD, experts_TK, weights_TK, expert_weights, cfg, group):
    """`_dropless` with the experts split over `group`: the group's tokens gathered, this
    device's experts applied, the partial sums reduce-scattered back."""
    gather = lambda a: jax.lax.all_gather(a, group, axis=0, tiled=True)  # noqa: E731
    first = jax.lax.axis_index(group) * expert_count(expert_weights[0])
    y_TD, served_T = _dropless(gather(x_TD.astype(_exchanged(cfg.dtype))), gather(experts_TK),
                               gather(weights_TK), expert_weights, cfg, first)
    scatter = lambda a: jax.lax.psum_scatter(a, group, scatter_dimension=0, tiled=True)  # noqa: E731
    return scatter(y_TD.astype(_exchanged(cfg.dtype))), scatter(served_T)


def _exchanged(dtype):
    """The dtype tokens and outputs are gathered and summed in across devices: the compute
    dtype, but float32 on XLA:CPU (jaxlib 0.10.2), which aborts compiling a bfloat16
    reduce-scatter ("Invalid binary instruction opcode copy"; an all-gather's gradient is
    one)."""
    return jnp.float32 if target_backend() == "cpu" else dtype


def capacity(tokens: int, k: int, experts: int, factor: float) -> int:
    """Assignments each expert takes from a batch shard of `tokens` tokens."""
    return max(1, math.ceil(factor * tokens * k / experts))


def _with_capacity(x_TD, experts_TK, weights_TK, expert_weights, cfg, group):
    T, k = experts_TK.shape
    E = cfg.num_experts
    C = capacity(T, k, E, cfg.expert_capacity_factor)
    # Priority: every token's first choice, then every second choice, each in token order.
    expert_S = experts_TK.T.reshape(k * T)
    order_S = jnp.argsort(expert_S, stable=True)
    sizes_E = jnp.bincount(expert_S, length=E)
    sorted_rank_S = jnp.arange(k * T) - (jnp.cumsum(sizes_E) - sizes_E)[expert_S[order_S]]
    rank_S = jnp.zeros_like(sorted_rank_S).at[order_S].set(sorted_rank_S)
    kept_S = rank_S < C
    slot_S = jnp.where(kept_S, expert_S * C + rank_S, E * C)  # past the end: dropped
    token_S = jnp.tile(jnp.arange(T), k)
    x_ECD = (jnp.zeros((E * C, x_TD.shape[-1]), cfg.dtype)
             .at[slot_S].set(x_TD.astype(cfg.dtype)[token_S], mode="drop")
             .reshape(E, C, -1))
    if group:
        x_ECD = _to_experts(x_ECD, group)
    y_ECD = batched_mlp(x_ECD, *expert_weights, cfg.mlp_activation, cfg.dtype)
    if group:
        y_ECD = _from_experts(y_ECD, group)
    y_SD = jnp.where(kept_S[:, None],
                     jnp.take(y_ECD.reshape(E * C, -1), jnp.minimum(slot_S, E * C - 1), axis=0), 0)
    y_KTD = y_SD.reshape(k, T, -1).astype(jnp.float32)
    y_TD = jnp.einsum("KTD,TK->TD", y_KTD, weights_TK)
    return y_TD, kept_S.reshape(k, T).astype(jnp.float32).sum(0)


def _to_experts(x_ECD, group):
    """Each device's buckets (E, C, D) to the devices holding their experts: there
    (E / n, n x C, D), every source's bucket of each of its experts."""
    E, C, D = x_ECD.shape
    n = jax.lax.axis_size(group)
    x_nFCD = jax.lax.all_to_all(x_ECD.reshape(n, E // n, C, D), group, 0, 0)
    return x_nFCD.transpose(1, 0, 2, 3).reshape(E // n, n * C, D)


def _from_experts(y_FCD, group):
    """The inverse of `_to_experts`: the outputs back to their tokens' devices, (E, C, D)."""
    here, nC, D = y_FCD.shape
    n = jax.lax.axis_size(group)
    y_nFCD = y_FCD.reshape(here, n, nC // n, D).transpose(1, 0, 2, 3)
    return jax.lax.all_to_all(y_nFCD, group, 0, 0).reshape(n * here, nC // n, D)
