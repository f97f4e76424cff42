"""The mixture-of-experts MLP every MoE family shares, dropless, and its router losses.

A router (a (D, E) weight, its logits and softmax in float32) sends each token to its top-k
experts; each expert is a gated MLP, their weights stacked (E, D, F) and (E, F, D). The k
assignments of every token are sorted by expert and each expert multiplies its contiguous
group (`jax.lax.ragged_dot`, a grouped matrix product): no capacity, no token dropped,
however unbalanced the routing. The results are put back in token order and summed with the
routing weights. On a mesh each batch shard sorts and computes its own tokens (a shard_map
over the batch's mesh axes).

The layer reports per-token router statistics as NNX intermediates; the decoder sums them
over real tokens for each layer (models/decoder.py) and `router_metrics` turns them into the
load-balancing and z losses the training objective adds (models/loss.py).
Shapes in names: T tokens (B x L), S assignments (T x k), E experts, K chosen (k), D embed,
F expert width.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pjit_llm.models.layers import ACTIVATIONS, param
from pjit_llm.models.moe_config import MoEConfig
from pjit_llm.models.quantize import Int8Weight
from pjit_llm.parallel.layout import Layout

# The per-token statistics the layer sows, summed over real tokens by the decoder:
# each expert's router probability, whether the token was routed to it (0 or 1), and the
# squared log-sum-exp of the router logits.
ROUTER_STATS = ("router_probs", "expert_tokens", "router_z")
# What the train step reports of the router (`router_metrics`), logged averaged over the
# steps of a log interval.
ROUTER_METRICS = ("moe_aux_loss", "router_z_loss", "expert_tokens_max", "expert_tokens_mean")


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


def grouped_experts(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, activation,
                    dtype) -> jax.Array:
    """Every token through each of its k experts, dropless: the T x k assignments sorted by
    expert, one grouped product per weight over the groups' sizes, the outputs put back in
    token order and summed with the routing weights (in float32). (T, D) in `dtype`."""
    T, k = experts_TK.shape
    E = (gate_EDF.values if isinstance(gate_EDF, Int8Weight) else gate_EDF).shape[0]
    experts_S = experts_TK.reshape(T * k)
    order_S = jnp.argsort(experts_S, stable=True)  # assignment at each sorted place
    sizes_E = jnp.bincount(experts_S, length=E).astype(jnp.int32)
    x_SD = jnp.take(x_TD.astype(dtype), order_S // k, axis=0)

    def grouped(name, a_SX, w_EXY):
        """A grouped product; an int8 weight's per-expert, per-output-channel scales applied
        to the (smaller) product, each sorted assignment taking its expert's."""
        if not isinstance(w_EXY, Int8Weight):
            return checkpoint_name(jax.lax.ragged_dot(a_SX, w_EXY.astype(dtype), sizes_E), name)
        out_SY = jax.lax.ragged_dot(a_SX, w_EXY.values.astype(dtype), sizes_E)
        scale_SY = jnp.take(w_EXY.scale, experts_S[order_S], axis=0)
        return checkpoint_name((out_SY.astype(jnp.float32) * scale_SY).astype(dtype), name)

    gate_SF, up_SF = grouped("mlp_gate", x_SD, gate_EDF), grouped("mlp_up", x_SD, up_EDF)
    h_SF = ACTIVATIONS[activation](gate_SF) * up_SF
    out_SD = grouped("mlp_down", h_SF, down_EFD)
    place_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(T * k, dtype=order_S.dtype))
    out_TKD = jnp.take(out_SD, place_S, axis=0).reshape(T, k, -1)
    return jnp.einsum("TKD,TK->TD", out_TKD.astype(jnp.float32), weights_TK).astype(dtype)


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
        compute = self._experts
        rows = () if self.layout is None else self.layout.mesh_axes("batch")
        if rows and x_BLD.shape[0] % self.layout.shards("batch") == 0:
            # Each batch shard sorts and multiplies its own tokens, the weights gathered as
            # FSDP gathers every weight; a sort over the global batch would gather every token
            # to every device and compute them all there. The other axes (tensor, context)
            # stay with the partitioner.
            # An axis the layout leaves to an enclosing transform (the pipeline's vmap over
            # `stage`, whose spmd_axis_name adds it to these specs) is manual here too.
            owned = {a for a in self.layout.excluded if self.layout.mesh.shape[a] > 1}
            compute = jax.shard_map(compute, mesh=self.layout.mesh, axis_names={*rows, *owned},
                                    in_specs=(P(rows), P()), out_specs=P(rows), check_vma=False)
            if jax.default_backend() == "cpu":
                # XLA:CPU (jaxlib 0.10.2) aborts compiling the step when bfloat16 weights
                # cross the shard_map ("Invalid binary instruction opcode copy" in the
                # gradients' all-reduce): they cross it in float32 there.
                weights = jax.tree.map(
                    lambda w: w.astype(jnp.float32) if w.dtype == jnp.bfloat16 else w, weights)
        y_BLD, stats = compute(x_BLD, weights)
        for name, value in zip(ROUTER_STATS, stats):
            self.sow(nnx.Intermediate, name, value)
        return y_BLD

    def _experts(self, x_BLD, weights):
        """(output (B, L, D), the per-token router statistics of ROUTER_STATS)."""
        cfg = self.cfg
        router_DE, gate_EDF, up_EDF, down_EFD = weights
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        logits_TE, probs_TE, weights_TK, experts_TK = route(
            x_TD, router_DE, cfg.experts_per_token, cfg.norm_topk_prob)
        y_TD = grouped_experts(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD,
                               cfg.mlp_activation, cfg.dtype)
        chosen_TE = jnp.sum(jax.nn.one_hot(experts_TK, cfg.num_experts, dtype=jnp.float32), axis=1)
        z_T = jnp.square(jax.nn.logsumexp(logits_TE, axis=-1))
        stats = tuple(v.reshape(B, L, *v.shape[1:]) for v in (probs_TE, chosen_TE, z_T))
        return y_TD.reshape(B, L, D), stats


def router_metrics(cfg, stats: dict, tokens: jax.Array) -> dict:
    """The router's losses and load from the decoder's statistics (each (layers, ...) summed
    over the `tokens` real tokens); {} for a model without experts.

    moe_aux_loss is transformers' `load_balancing_loss_func`: the fraction of assignments
    and the mean probability of each expert, each pooled over every layer, their product
    summed over experts, times the number of experts. expert_tokens_max is the most
    assignments any expert got in any layer, against expert_tokens_mean = tokens x k / E."""
    if not stats:
        return {}
    counts_NE, probs_NE, z_N = stats["expert_tokens"], stats["router_probs"], stats["router_z"]
    rows = counts_NE.shape[0] * jnp.maximum(tokens, 1.0)
    fraction_E = jnp.sum(counts_NE, axis=0) / rows
    probability_E = jnp.sum(probs_NE, axis=0) / rows
    return {"moe_aux_loss": cfg.num_experts * jnp.sum(fraction_E * probability_E),
            "router_z_loss": jnp.sum(z_N) / rows,
            "expert_tokens_max": jnp.max(counts_NE),
            "expert_tokens_mean": tokens * cfg.experts_per_token / cfg.num_experts}


def router_loss(cfg, metrics: dict) -> jax.Array:
    """What the router adds to each token's training loss (0 without experts)."""
    if not metrics:
        return jnp.float32(0)
    return (cfg.router_aux_loss_coef * metrics["moe_aux_loss"]
            + cfg.router_z_loss_coef * metrics["router_z_loss"])
