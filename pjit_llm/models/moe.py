"""The mixture-of-experts MLP every MoE family shares, and its router losses.

A router (a (D, E) weight, its logits and softmax in float32) sends each token to its top-k
experts; each expert is a gated MLP, their weights stacked (E, D, F) and (E, F, D). How the
assignments reach their experts, dropless or within a capacity, and come back is
models/expert_dispatch.py. On a mesh each batch shard routes its own tokens (a shard_map over
the batch's mesh axes); the experts are split over the `expert` axes, and where those also
split the batch (the default rule table) the tokens travel to the devices holding their
experts instead of the experts' weights being gathered.

The layer reports per-token router statistics as NNX intermediates; the decoder sums them
over real tokens for each layer (models/decoder.py) and `router_metrics` turns them into the
load-balancing and z losses the training objective adds (models/loss.py).
Shapes in names: T tokens (B x L), S assignments (T x k), E experts, K chosen (k), D embed,
F expert width.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pjit_llm.models.expert_dispatch import expert_outputs
from pjit_llm.models.layers import param
from pjit_llm.models.moe_config import MoEConfig
from pjit_llm.models.target import target_backend
from pjit_llm.parallel.layout import Layout

# The per-token statistics the layer sows, summed over real tokens by the decoder:
# each expert's router probability, whether the token was routed to it (0 or 1), and the
# squared log-sum-exp of the router logits, and how many of its k assignments an expert
# computed (k but in capacity mode).
ROUTER_STATS = ("router_probs", "expert_tokens", "router_z", "expert_served")
# What the train step reports of the router (`router_metrics`), logged averaged over the
# steps of a log interval.
ROUTER_METRICS = ("moe_aux_loss", "router_z_loss", "expert_tokens_max", "expert_tokens_mean",
                  "expert_dropped_share")


def route(x_TD: jax.Array, router_DE: jax.Array, k: int, renormalise: bool):
    """(logits (T, E), probabilities (T, E), weights of the chosen (T, k), their experts
    (T, k)): a softmax over every expert in float32, its k largest, divided by their sum when
    `renormalise` (the order transformers' Mixtral and Qwen3-MoE routers compute)."""
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TE, k)
    if renormalise:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return logits_TE, probs_TE, weights_TK, experts_TK


class MoEMLP(nnx.Module):
    """The block's MLP as a mixture of experts (model.num_experts, experts_per_token,
    expert_mlp_dim, norm_topk_prob). The experts' weights name the logical axis `expert`."""

    def __init__(self, cfg: MoEConfig, layout: Layout | None, rngs: nnx.Rngs):
        D, E, F, pd, std = (cfg.embed_dim, cfg.num_experts, cfg.expert_size, cfg.param_dtype,
                            cfg.init_std)
        self.router = param(rngs, std, (D, E), ("embed", None), pd)
        self.expert_gate = param(rngs, std, (E, D, F), ("expert", "embed", "mlp"), pd)
        self.expert_up = param(rngs, std, (E, D, F), ("expert", "embed", "mlp"), pd)
        self.expert_down = param(rngs, std / (2 * cfg.num_layers) ** 0.5, (E, F, D),
                                 ("expert", "mlp", "embed"), pd)
        self.cfg, self.layout = cfg, layout

    def __call__(self, x_BLD):
        weights = (self.router[...], self.expert_gate[...], self.expert_up[...],
                   self.expert_down[...])
        compute, group = self._experts, ()
        rows = () if self.layout is None else self.layout.mesh_axes("batch")
        if rows and x_BLD.shape[0] % self.layout.shards("batch") == 0:
            # Each batch shard routes its own tokens: a sort over the global batch would
            # gather every token to every device. The experts stay split over the expert axes
            # that also split the batch; the tokens travel to them (`expert_outputs`). Over
            # the other axes (tensor, context) the partitioner works inside.
            group = tuple(a for a in self.layout.mesh_axes("expert") if a in rows)
            compute = partial(self._experts, group=group)
            # An axis the layout leaves to an enclosing transform (the pipeline's vmap over
            # `stage`, whose spmd_axis_name adds it to these specs) is manual here too.
            owned = {a for a in self.layout.excluded if self.layout.mesh.shape[a] > 1}
            compute = jax.shard_map(compute, mesh=self.layout.mesh, axis_names={*rows, *owned},
                                    in_specs=(P(rows), (P(), *[P(group or None)] * 3)),
                                    out_specs=P(rows), check_vma=False)
            if target_backend() == "cpu":
                # XLA:CPU (jaxlib 0.10.2) aborts compiling the step when the gradient of a
                # bfloat16 weight the shard_map replicates over some of its devices is summed
                # over them ("Invalid binary instruction opcode copy"): such weights cross in
                # float32 there (the router always; the experts unless `group` spans every
                # batch axis).
                replicated = [a for a in rows if a not in group and self.layout.mesh.shape[a] > 1]
                weights = tuple(_float32(w) if i == 0 or replicated else w
                                for i, w in enumerate(weights))
        y_BLD, stats = compute(x_BLD, weights)
        for name, value in zip(ROUTER_STATS, stats):
            self.sow(nnx.Intermediate, name, value)
        return y_BLD

    def _experts(self, x_BLD, weights, group=()):
        """(output (B, L, D), the per-token router statistics of ROUTER_STATS)."""
        cfg = self.cfg
        router_DE, *expert_weights = weights
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        logits_TE, probs_TE, weights_TK, experts_TK = route(
            x_TD, router_DE, cfg.experts_per_token, cfg.norm_topk_prob)
        y_TD, served_T = expert_outputs(x_TD, experts_TK, weights_TK, expert_weights, cfg, group)
        chosen_TE = jnp.sum(jax.nn.one_hot(experts_TK, cfg.num_experts, dtype=jnp.float32), axis=1)
        z_T = jnp.square(jax.nn.logsumexp(logits_TE, axis=-1))
        stats = tuple(v.reshape(B, L, *v.shape[1:]) for v in (probs_TE, chosen_TE, z_T, served_T))
        return y_TD.reshape(B, L, D), stats


def _float32(w):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, w)


def router_metrics(cfg, stats: dict, tokens: jax.Array) -> dict:
    """The router's losses and load from the decoder's statistics (each (layers, ...) summed
    over the `tokens` real tokens); {} for a model without experts.

    moe_aux_loss is transformers' `load_balancing_loss_func`: the fraction of assignments
    and the mean probability of each expert, each pooled over every layer, their product
    summed over experts, times the number of experts. expert_tokens_max is the most
    assignments any expert got in any layer, against expert_tokens_mean = tokens x k / E;
    expert_dropped_share the share of assignments no expert computed (capacity mode)."""
    if not stats:
        return {}
    counts_NE, probs_NE, z_N = stats["expert_tokens"], stats["router_probs"], stats["router_z"]
    rows = counts_NE.shape[0] * jnp.maximum(tokens, 1.0)
    fraction_E = jnp.sum(counts_NE, axis=0) / rows
    probability_E = jnp.sum(probs_NE, axis=0) / rows
    return {"moe_aux_loss": cfg.num_experts * jnp.sum(fraction_E * probability_E),
            "router_z_loss": jnp.sum(z_N) / rows,
            "expert_tokens_max": jnp.max(counts_NE),
            "expert_tokens_mean": tokens * cfg.experts_per_token / cfg.num_experts,
            "expert_dropped_share": 1.0 - jnp.sum(stats["expert_served"]) / (
                rows * cfg.experts_per_token)}


def router_loss(cfg, metrics: dict) -> jax.Array:
    """What the router adds to each token's training loss (0 without experts)."""
    if not metrics:
        return jnp.float32(0)
    return (cfg.router_aux_loss_coef * metrics["moe_aux_loss"]
            + cfg.router_z_loss_coef * metrics["router_z_loss"])
