"""A Llama-style decoder-only transformer in Flax NNX.

Embedding, RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, optional tied
embeddings. Every parameter names its logical axes (metadata `logical_axes`); the layers are
one stacked parameter tree with a leading `layers` axis, run by a scan or unrolled, or as
pipeline stages (parallel/stages.py).
Shapes in names: B batch, L length, D embed, H heads, G kv heads, K head dim, F mlp, V vocab.
"""

from collections.abc import Callable
from functools import cache, partial

import jax
import jax.numpy as jnp
from flax import nnx

from pjit_llm.models.fp8_state import DelayedScales, split_histories
from pjit_llm.models.llama.config import ModelConfig
from pjit_llm.models.matmul import matmul, take_rows
from pjit_llm.models.quantize import Int8Weight
from pjit_llm.parallel.layout import Layout, attention_kv_heads, constrain
from pjit_llm.parallel.stages import STAGE_AXIS, Pipeline, merge_microbatches, split_microbatches

Axes = tuple[str | None, ...]

# The outputs of a block's linear projections, tagged by `matmul` so that a remat policy can
# keep them while recomputing the cheap elementwise work and the attention.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "mlp_gate", "mlp_up", "mlp_down")

# The logical axes each weight's multiplies contract (the einsums below): int8 quantization
# (models/quantize.py) keeps one scale per remaining, output, channel. The embedding table is
# scaled per row (per token), which serves its lookup and the tied vocabulary projection alike.
QUANTIZED_WEIGHTS: dict[str, Axes] = {
    "wq": ("embed",), "wk": ("embed",), "wv": ("embed",), "wo": ("heads", "head_dim"),
    "w_gate": ("embed",), "w_up": ("embed",), "w_down": ("mlp",),
    "embed": ("embed",), "unembed": ("embed",)}

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every matmul output
    "proj": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    # The same tensors, parked in host memory between the forward and the backward pass.
    "proj_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(PROJECTIONS),
        offload_src="device", offload_dst="pinned_host"),
}


def padded_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
    """The vocabulary rounded up to a multiple of 128: it then splits over any power-of-two
    number of shards up to 128 whatever the mesh, so one checkpoint serves every mesh (and
    the vocabulary projection gets whole matmul tiles)."""
    return -(-tokenizer_vocab // multiple) * multiple


def mask_padded_vocab(logits_BLV: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The logits with those of the padding ids (model.real_vocab_size and above) at the
    lowest finite value: they take no probability in the loss or in sampling, get no gradient,
    and the real ids' logits are unchanged."""
    real, V = cfg.true_vocab, logits_BLV.shape[-1]
    if real >= V:
        return logits_BLV
    return jnp.where(jnp.arange(V) < real, logits_BLV, jnp.finfo(logits_BLV.dtype).min)


def kv_heads_axis(cfg: ModelConfig, layout: Layout | None) -> tuple[int, str]:
    """(key/value heads attention computes with, the logical axis they are sharded as): the
    model's own as `kv_heads`, or, repeated to match the tensor shards, as `heads`."""
    used = attention_kv_heads(layout, cfg.num_heads, cfg.num_kv_heads)
    return used, "kv_heads" if used == cfg.num_kv_heads else "heads"


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    init = jax.nn.initializers.normal(std)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _delayed_scales(cfg: ModelConfig, projections: tuple[str, ...]) -> DelayedScales | None:
    """The amax histories of these projections under model.fp8_scaling=delayed, else None."""
    if cfg.fp8_scaling != "delayed":
        return None
    return DelayedScales(projections, cfg.fp8_amax_history)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


def rope_angles(positions_BL: jax.Array, head_dim: int, theta: float,
                cfg: ModelConfig | None = None):
    """sin and cos of the rotary angles, (B, L, K/2), in float32; `cfg` may stretch the
    frequencies for long contexts (model.rope_scaling)."""
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if cfg is not None:
        freqs = scale_rope_frequencies(freqs, cfg)
    angles = positions_BL[..., None].astype(jnp.float32) * freqs
    return jnp.sin(angles), jnp.cos(angles)


def scale_rope_frequencies(freqs_k: jax.Array, cfg: ModelConfig) -> jax.Array:
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
    def __init__(self, cfg: ModelConfig, layout: Layout | None, rngs: nnx.Rngs):
        D, H, G, K = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd, std = cfg.param_dtype, cfg.init_std
        out_std = std / (2 * cfg.num_layers) ** 0.5  # residual branches start small
        self.wq = _param(rngs, std, (D, H, K), ("embed", "heads", "head_dim"), pd)
        self.wk = _param(rngs, std, (D, G, K), ("embed", "kv_heads", "head_dim"), pd)
        self.wv = _param(rngs, std, (D, G, K), ("embed", "kv_heads", "head_dim"), pd)
        self.wo = _param(rngs, out_std, (H, K, D), ("heads", "head_dim", "embed"), pd)
        self.fp8 = _delayed_scales(cfg, PROJECTIONS[:4])
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
            wk_DGK, wv_DGK = (_repeat_heads(w, self.kv_repeats, self.layout) for w in (wk_DGK, wv_DGK))
        q_BLHK = matmul("BLD,DHK->BLHK", x_BLD, self.wq[...], dt, "q_proj", kind)
        k_BLGK = matmul("BLD,DGK->BLGK", x_BLD, wk_DGK, dt, "k_proj", kind)
        v_BLGK = matmul("BLD,DGK->BLGK", x_BLD, wv_DGK, dt, "v_proj", kind)
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
            out_BLHK = attend_one_position(q_BLHK, k_BLGK, v_BLGK, mask_B1LS)
        else:
            # attention.resolve_attention decides between the kernels ("auto" means XLA
            # unless resolved); a prefill attends over a cache under a general mask: XLA's.
            impl = "cudnn" if self.cfg.attention == "cudnn" and kv is None else "xla"
            out_BLHK = jax.nn.dot_product_attention(
                q_BLHK, k_BLGK, v_BLGK, mask=mask_B1LS, is_causal=kv is None and causal,
                implementation=impl)
        return matmul("BLHK,HKD->BLD", out_BLHK, self.wo[...], dt, "attn_out", kind), kv


def attend_one_position(q_B1HK, k_BSGK, v_BSGK, mask_B11S) -> jax.Array:
    """Attention of one new position per row over the cache, in float32, as multiply-and-sum
    reductions: these read the cache in its stored layout, where a batched matmul would first
    copy it transposed, every step, for a single query row that gives a matmul nothing to
    gain. Query head h uses key/value head h // (H / G), as in grouped-query attention."""
    B, _, H, K = q_B1HK.shape
    G = k_BSGK.shape[2]
    q_B1GRK = q_B1HK.astype(jnp.float32).reshape(B, 1, G, H // G, K) * K ** -0.5
    k_BSG1K, v_BSG1K = k_BSGK[:, :, :, None, :], v_BSGK[:, :, :, None, :]
    scores_BSGR = jnp.sum(q_B1GRK * k_BSG1K.astype(jnp.float32), axis=-1)
    scores_BSGR = jnp.where(mask_B11S[:, 0, 0, :, None, None], scores_BSGR, -jnp.inf)
    probs_BSGR = jax.nn.softmax(scores_BSGR, axis=1)
    out_BGRK = jnp.sum(probs_BSGR[..., None] * v_BSG1K.astype(jnp.float32), axis=1)
    return out_BGRK.reshape(B, 1, H, K).astype(q_B1HK.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout | None, rngs: nnx.Rngs):
        D, F, pd, std = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype, cfg.init_std
        self.w_gate = _param(rngs, std, (D, F), ("embed", "mlp"), pd)
        self.w_up = _param(rngs, std, (D, F), ("embed", "mlp"), pd)
        self.w_down = _param(rngs, std / (2 * cfg.num_layers) ** 0.5, (F, D), ("mlp", "embed"), pd)
        self.fp8 = _delayed_scales(cfg, PROJECTIONS[4:])
        self.cfg, self.layout = cfg, layout

    def __call__(self, x_BLD):
        dt, kind = self.cfg.dtype, self.cfg.matmul if self.fp8 is None else self.fp8
        gate_BLF = matmul("BLD,DF->BLF", x_BLD, self.w_gate[...], dt, "mlp_gate", kind)
        up_BLF = matmul("BLD,DF->BLF", x_BLD, self.w_up[...], dt, "mlp_up", kind)
        h_BLF = constrain(self.layout, jax.nn.silu(gate_BLF) * up_BLF, ("batch", "length", "mlp"))
        return matmul("BLF,FD->BLD", h_BLF, self.w_down[...], dt, "mlp_down", kind)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout | None, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, layout, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        self.mlp = MLP(cfg, layout, rngs)
        self.layout = layout

    def __call__(self, x_BLD, sin, cos, mask_B1LS, kv=None, causal=True):
        attn_BLD, kv = self.attn(self.attn_norm(x_BLD), sin, cos, mask_B1LS, kv, causal)
        x_BLD = x_BLD + attn_BLD
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return constrain(self.layout, x_BLD, ("batch", "length", "embed")), kv


class Transformer(nnx.Module):
    """With `pipeline`, training and evaluation run the layers as pipeline stages along the
    `stage` mesh axis (parallel/stages.py); the stacked layers are then in its stage order.
    Decoding with a cache always runs them one after another."""

    def __init__(self, cfg: ModelConfig, layout: Layout | None, rngs: nnx.Rngs,
                 pipeline: Pipeline | None = None, layer_list: bool = False):
        if cfg.vocab_size <= 0:
            raise ValueError("resolve model.vocab_size from the tokenizer before building the model")
        D, V, pd = cfg.embed_dim, cfg.vocab_size, cfg.param_dtype
        self.embed = _param(rngs, cfg.init_std, (V, D), ("vocab", "embed"), pd)
        # Inside the layers `stage` belongs to the pipeline (or to the stacked weights alone),
        # so their activations are sharded over the other axes only.
        block_layout = None if layout is None else layout.without(STAGE_AXIS)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0,
                  transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, block_layout, rngs)

        if layer_list:  # one parameter tree per layer: see `unstack_layers`
            self.blocks = nnx.List([Block(cfg, block_layout, rngs) for _ in range(cfg.num_layers)])
        else:
            self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(D, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, cfg.init_std, (D, V), ("embed", "vocab"), pd)
        self.cfg, self.layout, self.pipeline = cfg, layout, pipeline
        self.block_layout = block_layout

    def __call__(self, tokens_BL, segment_ids_BL, positions_BL, slots_BL=None) -> jax.Array:
        """Logits (B, L, V) in the compute dtype."""
        return self.logits(self.hidden(tokens_BL, segment_ids_BL, positions_BL, slots_BL))

    def hidden(self, tokens_BL, segment_ids_BL, positions_BL, slots_BL=None) -> jax.Array:
        """The final normalised hidden states (B, L, D), which `logits` projects onto the
        vocabulary. Tokens attend only within their segment unless model.segment_mask is off.
        `slots_BL`: each token's place in its row when the rows come reordered (context load
        balance); causality then follows the slots, not the array order."""
        x_BLD = self._embed(tokens_BL)
        if self.pipeline is None:
            sin, cos = rope_angles(positions_BL, self.cfg.head_dim, self.cfg.rope_theta, self.cfg)
            mask_B1LS = self._mask(segment_ids_BL, slots_BL, self.layout)
            x_BLD = self._run_blocks(x_BLD, sin, cos, mask_B1LS, causal=slots_BL is None)
        else:
            x_BLD = self._run_pipeline(x_BLD, segment_ids_BL, positions_BL, slots_BL)
        return self.final_norm(x_BLD)

    def _mask(self, segment_ids_BL, slots_BL, layout: Layout | None):
        """(B, 1, L, L) or None: same segment (model.segment_mask), and with `slots_BL` key
        slot <= query slot. Its query axis is sharded like the queries (`length`)."""
        mask_B1LS = None
        if self.cfg.segment_mask:
            mask_B1LS = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
        if slots_BL is not None:
            causal_B1LS = slots_BL[:, None, :, None] >= slots_BL[:, None, None, :]
            mask_B1LS = causal_B1LS if mask_B1LS is None else mask_B1LS & causal_B1LS
        if mask_B1LS is None:
            return None
        return constrain(layout, mask_B1LS, ("batch", None, "length", None))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        return self.project(x_BLD, self.output_weights())

    def output_weights(self) -> jax.Array:
        """The vocabulary projection (V, D) in the compute dtype, FSDP shards gathered (as for
        every weight), so that a loop over chunks of positions gathers it once."""
        w_VD = self.embed[...] if self.cfg.tie_embeddings else self.unembed[...].T
        if not isinstance(w_VD, Int8Weight):  # int8 values reach matmul as they are
            w_VD = w_VD.astype(self.cfg.dtype)
        return _constrain_table(self.layout, w_VD)

    def project(self, x_BLD: jax.Array, w_VD: jax.Array) -> jax.Array:
        logits_BLV = mask_padded_vocab(matmul("BLD,VD->BLV", x_BLD, w_VD, self.cfg.dtype), self.cfg)
        return constrain(self.layout, logits_BLV, ("batch", "length", "vocab"))

    def decode(self, tokens_BL, positions_BL, cache: tuple[dict, ...]):
        """Logits for new tokens at `positions` (consecutive per row) given the key/value
        cache of the earlier ones, one {"k", "v": (B, S, G, K)} per layer; returns (logits,
        cache). The layers run one after another, each writing only its new entries into its
        own cache buffers, which a decode loop then updates in place. Stacked layers are
        sliced here on every call (a copy of their weights): a loop of decode steps should
        run the model with a layer list (`unstack_layers`) instead."""
        slots_S = jnp.arange(cache[0]["k"].shape[1])
        mask_B1LS = slots_S[None, None, None, :] <= positions_BL[:, None, :, None]
        cfg, layout = self.cfg, self.block_layout
        sin, cos = rope_angles(positions_BL, cfg.head_dim, cfg.rope_theta, cfg)
        x_BLD = self._embed(tokens_BL)
        axes = cache_axes(cfg, layout)
        written = []
        for i, layer_cache in enumerate(cache):
            k, v = (constrain(layout, layer_cache[n], axes) for n in ("k", "v"))
            x_BLD, (k, v) = self._layer(i)(x_BLD, sin, cos, mask_B1LS, (k, v, positions_BL[:, 0]))
            written.append({"k": k, "v": v})
        return self.logits(self.final_norm(x_BLD)), tuple(written)

    def _layer(self, i: int) -> Block:
        if isinstance(self.blocks, nnx.List):
            return self.blocks[i]
        graphdef, stacked = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(partial(_index, i=i), stacked))

    def _embed(self, tokens_BL):
        # Gather the table's FSDP shards first (as FSDP does for every weight): a lookup into a
        # table sharded on `embed` cannot produce activations sharded on `batch` efficiently.
        table_VD = _constrain_table(self.layout, self.embed[...])
        x_BLD = take_rows(table_VD, tokens_BL, self.cfg.dtype)
        return constrain(self.layout, x_BLD, ("batch", "length", "embed"))

    def _run_blocks(self, x_BLD, sin, cos, mask_B1LS, stacked=None, causal=True):
        """The stacked layers (all, or the block `stacked`), scanned or unrolled."""
        graphdef, all_layers = nnx.split(self.blocks)
        stacked = all_layers if stacked is None else stacked

        def apply(x, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x, sin, cos, mask_B1LS, causal=causal)[0], None

        if self.cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.cfg.remat],
                                   prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(apply, x_BLD, stacked)[0]
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            x_BLD = apply(x_BLD, jax.tree.map(partial(_index, i=i), stacked))[0]
        return x_BLD

    def _run_pipeline(self, x_BLD, segment_ids_BL, positions_BL, slots_BL=None):
        """The layers as pipeline stages over micro-batches of the batch."""
        cfg, M = self.cfg, self.pipeline.microbatches
        activation_axes = ("batch", "length", "embed")
        x_MbLD = constrain(self.block_layout, split_microbatches(x_BLD, M),
                            (None, *activation_axes))

        def stage(layers, x_bLD, extras):
            segment_ids_bL, positions_bL, slots_bL = extras
            sin, cos = rope_angles(positions_bL, cfg.head_dim, cfg.rope_theta, cfg)
            mask_b1LS = self._mask(segment_ids_bL, slots_bL, self.block_layout)
            return self._run_blocks(x_bLD, sin, cos, mask_b1LS, stacked=nnx.merge_state(*layers),
                                    causal=slots_bL is None)

        extras = (split_microbatches(segment_ids_BL, M), split_microbatches(positions_BL, M),
                  None if slots_BL is None else split_microbatches(slots_BL, M))
        # fp8 amax histories are overwritten by their gradients: max over micro-batches.
        weights, histories = split_histories(nnx.split(self.blocks)[1])
        y_MbLD = self.pipeline.run(stage, weights, x_MbLD, extras, self.layout.mesh,
                                   self.block_layout.spec(activation_axes), histories)
        return constrain(self.layout, merge_microbatches(y_MbLD), activation_axes)


def _repeat_heads(w_DGK, repeats: int, layout: Layout | None):
    """A key/value projection with each head repeated `repeats` times in place, sharded like
    the query projection, so each shard slices the heads it uses from its whole copy (and
    their gradients sum back into the true heads). An int8 one with its scales."""
    if isinstance(w_DGK, Int8Weight):
        return Int8Weight(_repeat_heads(w_DGK.values, repeats, layout),
                          constrain(layout, jnp.repeat(w_DGK.scale, repeats, axis=0),
                                     ("heads", "head_dim")))
    return constrain(layout, jnp.repeat(w_DGK, repeats, axis=1), ("embed", "heads", "head_dim"))


def _index(a: jax.Array, i: int) -> jax.Array:
    return a[i]


def _constrain_table(layout: Layout | None, w_VD):
    """A (V, D) table with its FSDP shards gathered; an int8 one with its row scales."""
    if isinstance(w_VD, Int8Weight):
        return Int8Weight(constrain(layout, w_VD.values, ("vocab", None)),
                          constrain(layout, w_VD.scale, ("vocab",)))
    return constrain(layout, w_VD, ("vocab", None))


def cache_axes(cfg: ModelConfig, layout: Layout | None) -> Axes:
    """The logical axes of one layer's cached keys or values, (B, S, G, K): the heads as
    attention uses them (`kv_heads_axis`)."""
    return ("batch", "length", kv_heads_axis(cfg, layout)[1], "head_dim")


def init_cache(cfg: ModelConfig, layout: Layout | None, batch: int,
               length: int) -> tuple[dict, ...]:
    """An empty key/value cache for `Transformer.decode`: per layer, `length` slots for each
    of `batch` rows."""
    shape = (batch, length, kv_heads_axis(cfg, layout)[0], cfg.head_dim)
    return tuple({"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
                 for _ in range(cfg.num_layers))


def abstract_model(cfg: ModelConfig, layout: Layout | None, pipeline: Pipeline | None = None,
                   layer_list: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameter shapes (with logical axes), without allocating."""
    model = nnx.eval_shape(lambda: Transformer(cfg, layout, nnx.Rngs(0), pipeline, layer_list))
    return nnx.split(model)


@cache
def _layer_splitter(layers: int, sharding: jax.sharding.NamedSharding):
    """One compiled split per stacked sharding (and shape), reused by every `prepare`."""
    one = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.jit(lambda a: tuple(a[i] for i in range(layers)), out_shardings=(one,) * layers)


def unstack_layers(params: nnx.State, donate: bool = False) -> nnx.State:
    """`params` with the stacked layers as one tree per layer, the state of
    `Transformer(..., layer_list=True)`: a decode step then reads each layer's weights where
    they lie instead of slicing (copying) them out of the stack every step. Each layer keeps
    the stacked sharding less the layer axis. With `donate`, each stacked array is freed once
    split, so the weights are never held twice."""
    def split(a):
        if isinstance(a.sharding, jax.sharding.NamedSharding):
            layers = _layer_splitter(a.shape[0], a.sharding)(a)
        else:
            layers = tuple(a[i] for i in range(a.shape[0]))
        if donate:
            a.delete()
        return layers

    leaves, treedef = jax.tree.flatten(params["blocks"])
    per_leaf = [split(a) for a in leaves]
    layers = {i: treedef.unflatten([t[i] for t in per_leaf]) for i in range(len(per_leaf[0]))}
    return nnx.State({**{k: v for k, v in params.items() if k != "blocks"}, "blocks": layers})
