"""Attention itself, on XLA's kernel or cuDNN's, and what each keeps for the backward pass.

Both kernels keep the same things between the passes: queries, keys, values, the output and the
log-sum-exp of each query row's scores (FlashAttention's softmax statistics). cuDNN's fused
kernel does so by construction. XLA's is written here with that custom gradient: its backward
pass recomputes the probabilities from the kept log-sum-exp instead of storing the
(B, H, L, S) probabilities of every layer. A remat policy that saves the output and the
statistics (`keeps_attention`) therefore runs no attention forward in the backward pass.

Packed documents: XLA's kernel takes a dense (B, 1, L, S) mask. cuDNN's can instead take each
row's document offsets and lengths (its packed layout, `PackedSegments`), which costs nothing
like reading an L x L mask; a row with more documents than the layout has room for falls back
to the dense mask for that step, so the result is the same either way.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # no public packed layout
from jax.ad_checkpoint import checkpoint_name

OUTPUT_NAME = "attn_context"  # attention's output, before the output projection
STATISTICS_NAME = "attn_lse"  # per query row: log-sum-exp of its scores, float32
# JAX's primitive for cuDNN's forward kernel, whose outputs are the same two tensors (its
# custom gradient keeps them); tests/test_attention_kernels.py checks the name still exists.
CUDNN_FORWARD_PRIMITIVE = "dot_product_attention_fwd_wrapper"



class PackedSegments(NamedTuple):
    """Each row's documents as runs of equal segment ids, for cuDNN's packed layout: `starts`
    (B, M+1) and `lengths` (B, M), -1 past a row's last document, and `fits`, whether every
    row has at most M documents. The trailing padding of a row is a run like any other, so
    the runs tile each row exactly. `ids` builds the dense mask when a row does not fit."""
    ids_BL: jax.Array
    starts_BM1: jax.Array
    lengths_BM: jax.Array
    fits: jax.Array


def packed_segments(segment_ids_BL: jax.Array, max_segments: int) -> PackedSegments:
    B, L = segment_ids_BL.shape
    M = max_segments
    begins_BL = jnp.concatenate([jnp.ones((B, 1), bool),
                                 segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    run_BL = jnp.cumsum(begins_BL, axis=1, dtype=jnp.int32) - 1  # each token's run
    count_B = run_BL[:, -1] + 1
    rows_BL = jnp.broadcast_to(jnp.arange(B)[:, None], (B, L))
    lengths_BM = jnp.zeros((B, M), jnp.int32).at[rows_BL, run_BL].add(1, mode="drop")
    used_BM = jnp.arange(M)[None, :] < count_B[:, None]
    starts_BM = jnp.cumsum(lengths_BM, axis=1) - lengths_BM
    starts_BM1 = jnp.concatenate([jnp.where(used_BM, starts_BM, -1),
                                  jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return PackedSegments(segment_ids_BL, starts_BM1, jnp.where(used_BM, lengths_BM, -1),
                          jnp.all(count_B <= M))


def same_segment_mask(segment_ids_BL: jax.Array) -> jax.Array:
    """(B, 1, L, L): query and key in the same document."""
    return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


def attend(q_BLHK, k_BSGK, v_BSGK, mask, causal: bool, implementation: str,
           scale: float | None = None) -> jax.Array:
    """Attention of each query head h over key/value head h // (H / G), the scores scaled by
    `scale` (default K^-1/2). `mask`: None, a (B, 1, L, S) boolean mask, or (cuDNN only)
    `PackedSegments`; `causal` adds key position <= query position."""
    scale = q_BLHK.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "xla":
        if isinstance(mask, PackedSegments):
            raise ValueError("packed segments are for cuDNN; XLA's kernel takes a dense mask")
        return xla_attention(q_BLHK, k_BSGK, v_BSGK, mask, causal, scale)
    if isinstance(mask, PackedSegments):
        return _cudnn_packed(q_BLHK, k_BSGK, v_BSGK, mask, scale)
    return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask, is_causal=causal,
                                        scale=scale, implementation="cudnn")


def _cudnn_packed(q_BLHK, k_BSGK, v_BSGK, segments: PackedSegments, scale: float) -> jax.Array:
    """Causal attention within each document, from the documents' offsets when every row
    fits the layout, else under the dense mask (same result, slower)."""
    def packed(q, k, v, segments):
        lengths = segments.lengths_BM
        return cudnn_fmha.dot_product_attention(
            q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=segments.starts_BM1,
            kv_offsets=segments.starts_BM1, scale=scale,
            mask_type=cudnn_fmha.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")

    def dense(q, k, v, segments):
        return jax.nn.dot_product_attention(q, k, v, mask=same_segment_mask(segments.ids_BL),
                                            is_causal=True, scale=scale, implementation="cudnn")

    return jax.lax.cond(segments.fits, packed, dense, q_BLHK, k_BSGK, v_BSGK, segments)


def keeps_attention(*names: str):
    """A remat policy saving the tensors `names` tag plus attention's output and statistics
    on either kernel: the backward pass then never runs an attention forward."""
    saves_names = jax.checkpoint_policies.save_only_these_names(*names, OUTPUT_NAME,
                                                                 STATISTICS_NAME)

    def policy(primitive, *args, **params):
        return primitive.name == CUDNN_FORWARD_PRIMITIVE or saves_names(primitive, *args, **params)

    return policy


def _visible(mask_B1LS, causal: bool, L: int, S: int):
    """(B, 1, 1, L, S)-broadcastable visibility for grouped scores (B, G, R, L, S), or None."""
    visible = None if mask_B1LS is None else mask_B1LS[:, :, None]
    if causal:
        lower_LS = jnp.tril(jnp.ones((L, S), bool))
        visible = lower_LS if visible is None else visible & lower_LS
    return visible


def _grouped(q_BLHK, G: int):
    B, L, H, K = q_BLHK.shape
    return q_BLHK.reshape(B, L, G, H // G, K)


def _scores(q_BLGRK, k_BSGK, visible, scale: float):
    """Scaled scores (B, G, R, L, S) in float32, -inf where masked."""
    scores = jnp.einsum("BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK,
                        preferred_element_type=jnp.float32) * scale
    return scores if visible is None else jnp.where(visible, scores, -jnp.inf)


def _finite(x):
    """-inf (the statistics of a row with nothing visible) as 0: such a row's probabilities
    are then exp(-inf) = 0 and its output 0, as in fused kernels, never NaN."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def xla_attention(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, causal: bool, scale: float):
    """XLA's attention, numerically that of jax.nn.dot_product_attention (float32 softmax,
    probabilities in the values' dtype), keeping only the output and its statistics for the
    backward pass. A query row with no visible key gets 0 (jax's gives the mean value)."""
    return _xla_forward(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, causal, scale)[0]


def _xla_forward(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, causal, scale):
    B, L, H, K = q_BLHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    scores = _scores(_grouped(q_BLHK, G), k_BSGK, _visible(mask_B1LS, causal, L, S), scale)
    peak = _finite(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs = (unnormalised / jnp.where(total > 0, total, 1.0)).astype(v_BSGK.dtype)
    lse_BGRL = _finite(peak + jnp.log(total))[..., 0]
    out_BLHK = jnp.einsum("BGRLS,BSGK->BLGRK", probs, v_BSGK).reshape(B, L, H, K)
    # The names are what model.remat=proj_attn keeps: tagged inside the forward rule, they
    # are the very tensors the backward rule reads.
    out_BLHK = checkpoint_name(out_BLHK, OUTPUT_NAME)
    lse_BGRL = checkpoint_name(lse_BGRL, STATISTICS_NAME)
    return out_BLHK, (q_BLHK, k_BSGK, v_BSGK, mask_B1LS, out_BLHK, lse_BGRL)


def _xla_backward(causal, scale, residuals, g_BLHK):
    """FlashAttention's backward pass, densely: P from the kept statistics, then
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q (scaled)."""
    q_BLHK, k_BSGK, v_BSGK, mask_B1LS, out_BLHK, lse_BGRL = residuals
    B, L, H, K = q_BLHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    q_BLGRK, g_BLGRK = _grouped(q_BLHK, G), _grouped(g_BLHK, G)
    scores = _scores(q_BLGRK, k_BSGK, _visible(mask_B1LS, causal, L, S), scale)
    probs = jnp.exp(scores - lse_BGRL[..., None])  # 0 where masked
    dv_BSGK = jnp.einsum("BGRLS,BLGRK->BSGK", probs.astype(g_BLHK.dtype), g_BLGRK,
                         preferred_element_type=jnp.float32)
    dprobs = jnp.einsum("BLGRK,BSGK->BGRLS", g_BLGRK, v_BSGK, preferred_element_type=jnp.float32)
    row_BLGR = jnp.sum(g_BLGRK.astype(jnp.float32) * _grouped(out_BLHK, G).astype(jnp.float32),
                       axis=-1)
    dscores = probs * (dprobs - jnp.moveaxis(row_BLGR, 1, 3)[..., None]) * scale
    dq_BLGRK = jnp.einsum("BGRLS,BSGK->BLGRK", dscores.astype(q_BLHK.dtype), k_BSGK,
                          preferred_element_type=jnp.float32)
    dk_BSGK = jnp.einsum("BGRLS,BLGRK->BSGK", dscores.astype(q_BLHK.dtype), q_BLGRK,
                         preferred_element_type=jnp.float32)
    return (dq_BLGRK.reshape(B, L, H, K).astype(q_BLHK.dtype), dk_BSGK.astype(k_BSGK.dtype),
            dv_BSGK.astype(v_BSGK.dtype), None)


xla_attention.defvjp(_xla_forward, _xla_backward)
