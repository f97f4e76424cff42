"""The layers every family builds its blocks from: RMSNorm (plain or Gemma's 1 + weight),
rotary positions, grouped-query attention (with the family's traits: per-head query/key norms,
a head size and a score scale of its own), the gated MLP (SwiGLU or GeGLU), the padded
vocabulary, and the remat policies over the projections they tag.
Every parameter names its logical axes (metadata `logical_axes`).
Shapes in names: B batch, L length, D embed, H heads, G kv heads, K head dim, F mlp, V vocab.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pjit_llm.models.attention_kernels import attend, keeps_attention
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.fp8_state import DelayedScales
from pjit_llm.models.matmul import matmul
from pjit_llm.models.quantize import Int8Weight
from pjit_llm.parallel.layout import Layout, attention_kv_heads, constrain

Axes = tuple[str | None, ...]

# The MLP's gate activations: SwiGLU's SiLU, GeGLU's GELU with tanh (transformers'
# gelu_pytorch_tanh).
ACTIVATIONS: dict[str, Callable] = {"silu": jax.nn.silu,
                                    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

# The outputs of a block's linear projections, tagged by `matmul` so that a remat policy can
# keep them while recomputing the cheap elementwise work and the attention.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "mlp_gate", "mlp_up", "mlp_down")

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every matmul output
    "proj": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    # The projections and attention's output and softmax statistics: the backward pass runs
    # no attention forward, for (B, L, H) float32 statistics and a (B, L, H, K) output a layer.
    "proj_attn": keeps_attention(*PROJECTIONS),
    # The projections' outputs, parked in host memory between the forward and backward pass.
    "proj_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(PROJECTIONS),
        offload_src="device", offload_dst="pinned_host"),
}


def padded_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
    """The vocabulary rounded up to a multiple of 128: it then splits over any power-of-two
    number of shards up to 128 whatever the mesh, so one checkpoint serves every mesh (and
    the vocabulary projection gets whole matmul tiles)."""
    return -(-tokenizer_vocab // multiple) * multiple


def mask_padded_vocab(logits_BLV: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """The logits with those of the padding ids (model.real_vocab_size and above) at the
    lowest finite value: they take no probability in the loss or in sampling, get no gradient,
    and the real ids' logits are unchanged."""
    real, V = cfg.true_vocab, logits_BLV.shape[-1]
    if real >= V:
        return logits_BLV
    return jnp.where(jnp.arange(V) < real, logits_BLV, jnp.finfo(logits_BLV.dtype).min)


def kv_heads_axis(cfg: DecoderConfig, layout: Layout | None) -> tuple[int, str]:
    """(key/value heads attention computes with, the logical axis they are sharded as): the
    model's own as `kv_heads`, or, repeated to match the tensor shards, as `heads`."""
    used = attention_kv_heads(layout, cfg.num_heads, cfg.num_kv_heads)
    return used, "kv_heads" if used == cfg.num_kv_heads else "heads"


def param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    init = jax.nn.initializers.normal(std)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _delayed_scales(cfg: DecoderConfig, projections: tuple[str, ...]) -> DelayedScales | None:
    """The amax histories of these projections under model.fp8_scaling=delayed, else None."""
    if cfg.fp8_scaling != "delayed":
        return None
    return DelayedScales(projections, cfg.fp8_amax_history)


class RMSNorm(nnx.Module):
    """Over the last axis, in float32; `axes` names the scale's logical axis. With `plus_one`
    (Gemma) the input is scaled by 1 + weight, the weight starting at 0."""

    def __init__(self, dim: int, eps: float, dtype, axes: Axes = ("embed",),
                 plus_one: bool = False):
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init((dim,), dtype), logical_axes=axes)
        self.eps, self.plus_one = eps, plus_one

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * (self.plus_one + self.scale[...].astype(jnp.float32))).astype(x_BLD.dtype)


def norm(cfg: DecoderConfig, dim: int, axes: Axes = ("embed",)) -> RMSNorm:
    """The family's RMSNorm over `dim`."""
    return RMSNorm(dim, cfg.norm_eps, cfg.param_dtype, axes, cfg.norm_plus_one)


def rope_angles(positions_BL: jax.Array, head_dim: int, theta: float,
                cfg: DecoderConfig | None = None):
    """sin and cos of the rotary angles, (B, L, K/2), in float32; `cfg` may stretch the
    frequencies for long contexts (model.rope_scaling)."""
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if cfg is not None:
        freqs = scale_rope_frequencies(freqs, cfg)
    angles = positions_BL[..., None].astype(jnp.float32) * freqs
    return jnp.sin(angles), jnp.cos(angles)


def scale_rope_frequencies(freqs_k: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """`linear` slows every frequency by rope_factor. `llama3` (Llama 3.1+) slows only the
    low frequencies, whose wavelength exceeds the original context / low_freq_factor, leaves
    those shorter than context / high_freq_factor alone, and blends smoothly in between."""
    if cfg.rope_scaling == "linear":
        return freqs_k / cfg.rope_factor
    if cfg.rope_scaling != "llama3":
        return freqs_k
    context, low, high = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen_k = 2 * jnp.pi / freqs_k
    blend_k = jnp.clip((context / wavelen_k - low) / (high - low), 0.0, 1.0)
    return (1 - blend_k) * freqs_k / cfg.rope_factor + blend_k * freqs_k


def apply_rope(x_BLHK: jax.Array, sin_BLk: jax.Array, cos_BLk: jax.Array) -> jax.Array:
    """Rotate the two halves of each head (the Llama convention)."""
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_BLk[:, :, None, :], cos_BLk[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs):
        D, H, G, K = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        pd, std = cfg.param_dtype, cfg.init_std
        out_std = std / (2 * cfg.num_layers) ** 0.5  # residual branches start small
        self.wq = param(rngs, std, (D, H, K), ("embed", "heads", "head_dim"), pd)
        self.wk = param(rngs, std, (D, G, K), ("embed", "kv_heads", "head_dim"), pd)
        self.wv = param(rngs, std, (D, G, K), ("embed", "kv_heads", "head_dim"), pd)
        self.wo = param(rngs, out_std, (H, K, D), ("heads", "head_dim", "embed"), pd)
        self.fp8 = _delayed_scales(cfg, PROJECTIONS[:4])
        if cfg.qk_norm:  # each query and key head normalised before rotary (Qwen3, Gemma 3)
            self.q_norm = norm(cfg, K, ("head_dim",))
            self.k_norm = norm(cfg, K, ("head_dim",))
        self.cfg, self.layout = cfg, layout
        used, self.kv_axis = kv_heads_axis(cfg, layout)
        self.kv_repeats = used // G

    def __call__(self, x_BLD, sin, cos, mask_B1LS, kv=None, causal=True):
        """Without `kv`: attention under `mask`, causal by array order too unless `causal` is
        off (a reordered row's mask holds its causal part). With
        kv=(k_cache_BSGK, v_cache_BSGK, start_B): the new keys and values are written into the
        cache at each row's start and the queries attend over the cache under `mask`.
        Returns (output, (k_cache, v_cache) or None)."""
        dt, kind = self.cfg.dtype, self.cfg.matmul if self.fp8 is None else self.fp8
        wk_DGK, wv_DGK = self.wk[...], self.wv[...]
        if self.kv_repeats > 1:  # G is here the repeated heads: each shard computes its own
            wk_DGK, wv_DGK = (repeat_heads(w, self.kv_repeats, self.layout) for w in (wk_DGK, wv_DGK))
        q_BLHK = matmul("BLD,DHK->BLHK", x_BLD, self.wq[...], dt, "q_proj", kind)
        k_BLGK = matmul("BLD,DGK->BLGK", x_BLD, wk_DGK, dt, "k_proj", kind)
        v_BLGK = matmul("BLD,DGK->BLGK", x_BLD, wv_DGK, dt, "v_proj", kind)
        if self.cfg.qk_norm:
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        q_BLHK = constrain(self.layout, apply_rope(q_BLHK, sin, cos),
                            ("batch", "length", "heads", "head_dim"))
        k_BLGK = constrain(self.layout, apply_rope(k_BLGK, sin, cos),
                            ("batch", "length", self.kv_axis, "head_dim"))
        if kv is not None:
            k_cache, v_cache, start_B = kv
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice(c, new, (i, 0, 0)))
            k_BLGK = write(k_cache, k_BLGK.astype(k_cache.dtype), start_B)
            v_BLGK = write(v_cache, v_BLGK.astype(v_cache.dtype), start_B)
            kv = (k_BLGK, v_BLGK)
        else:
            # Context parallelism (no-ops without it): queries stay in this device's slice of
            # the sequence and keys and values are gathered whole over `context`, so each
            # device's scores and mask are (L/C, L), shrinking as 1/C like the activations.
            # Only the (B, L, G, K) keys and values cross devices (with grouped-query heads,
            # less than the queries would), once per layer; the backward pass reduce-scatters
            # their gradients. A ring would also keep them at L/C, but the scores dominate.
            k_BLGK = constrain(self.layout, k_BLGK, ("batch", None, self.kv_axis, "head_dim"))
            v_BLGK = constrain(self.layout, v_BLGK, ("batch", None, self.kv_axis, "head_dim"))
        if kv is not None and q_BLHK.shape[1] == 1:  # a decode step
            out_BLHK = attend_one_position(q_BLHK, k_BLGK, v_BLGK, mask_B1LS,
                                           self.cfg.attention_scale)
        else:
            # attention.resolve_attention decides between the kernels ("auto" means XLA
            # unless resolved); a prefill attends over a cache under a general mask: XLA's.
            impl = "cudnn" if self.cfg.attention == "cudnn" and kv is None else "xla"
            out_BLHK = attend(q_BLHK, k_BLGK, v_BLGK, mask_B1LS, kv is None and causal, impl,
                              self.cfg.attention_scale)
        return matmul("BLHK,HKD->BLD", out_BLHK, self.wo[...], dt, "attn_out", kind), kv


def attend_one_position(q_B1HK, k_BSGK, v_BSGK, mask_B11S, scale: float) -> jax.Array:
    """Attention of one new position per row over the cache, in float32, as multiply-and-sum
    reductions: these read the cache in its stored layout, where a batched matmul would first
    copy it transposed, every step, for a single query row that gives a matmul nothing to
    gain. Query head h uses key/value head h // (H / G), as in grouped-query attention."""
    B, _, H, K = q_B1HK.shape
    G = k_BSGK.shape[2]
    q_B1GRK = q_B1HK.astype(jnp.float32).reshape(B, 1, G, H // G, K) * scale
    k_BSG1K, v_BSG1K = k_BSGK[:, :, :, None, :], v_BSGK[:, :, :, None, :]
    scores_BSGR = jnp.sum(q_B1GRK * k_BSG1K.astype(jnp.float32), axis=-1)
    scores_BSGR = jnp.where(mask_B11S[:, 0, 0, :, None, None], scores_BSGR, -jnp.inf)
    probs_BSGR = jax.nn.softmax(scores_BSGR, axis=1)
    out_BGRK = jnp.sum(probs_BSGR[..., None] * v_BSG1K.astype(jnp.float32), axis=1)
    return out_BGRK.reshape(B, 1, H, K).astype(q_B1HK.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs):
        D, F, pd, std = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype, cfg.init_std
        self.w_gate = param(rngs, std, (D, F), ("embed", "mlp"), pd)
        self.w_up = param(rngs, std, (D, F), ("embed", "mlp"), pd)
        self.w_down = param(rngs, std / (2 * cfg.num_layers) ** 0.5, (F, D), ("mlp", "embed"), pd)
        self.fp8 = _delayed_scales(cfg, PROJECTIONS[4:])
        self.cfg, self.layout = cfg, layout

    def __call__(self, x_BLD):
        dt, kind = self.cfg.dtype, self.cfg.matmul if self.fp8 is None else self.fp8
        gate_BLF = matmul("BLD,DF->BLF", x_BLD, self.w_gate[...], dt, "mlp_gate", kind)
        up_BLF = matmul("BLD,DF->BLF", x_BLD, self.w_up[...], dt, "mlp_up", kind)
        h_BLF = constrain(self.layout, ACTIVATIONS[self.cfg.mlp_activation](gate_BLF) * up_BLF,
                          ("batch", "length", "mlp"))
        return matmul("BLF,FD->BLD", h_BLF, self.w_down[...], dt, "mlp_down", kind)


def repeat_heads(w_DGK, repeats: int, layout: Layout | None):
    """A key/value projection with each head repeated `repeats` times in place, sharded like
    the query projection, so each shard slices the heads it uses from its whole copy (and
    their gradients sum back into the true heads). An int8 one with its scales."""
    if isinstance(w_DGK, Int8Weight):
        return Int8Weight(repeat_heads(w_DGK.values, repeats, layout),
                          constrain(layout, jnp.repeat(w_DGK.scale, repeats, axis=0),
                                     ("heads", "head_dim")))
    return constrain(layout, jnp.repeat(w_DGK, repeats, axis=1), ("embed", "heads", "head_dim"))


