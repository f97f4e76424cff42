"""Attention itself: XLA's kernel with its FlashAttention-style backward pass against
jax.nn.dot_product_attention, packed documents as cuDNN's layout wants them, and the remat
policy that keeps attention (model.remat=proj_attn) running no attention forward in the
backward pass, counted on the traced program."""

import inspect

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.models.attention_kernels import (CUDNN_FORWARD_PRIMITIVE, OUTPUT_NAME,
                                               cudnn_fmha, packed_segments, same_segment_mask,
                                               xla_attention)
from pjit_llm.models.loss import loss_terms

B, L, H, G, K = 2, 12, 4, 2, 8
SEGMENTS = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [7] * 12])  # two documents and padding; one


def qkv(dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    shapes = ((B, L, H, K), (B, L, G, K), (B, L, G, K), (B, L, H, K))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes)]


def value_and_grads(attention, q, k, v, weights):
    def loss(q, k, v):
        return (attention(q, k, v).astype(jnp.float32) * weights).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("mask,causal", [(None, True), (same_segment_mask(SEGMENTS), True),
                                         (same_segment_mask(SEGMENTS), False)],
                         ids=["causal", "causal+documents", "mask only (prefill)"])
def test_xla_attention_matches_jax_forward_and_backward(mask, causal):
    q, k, v, w = qkv()
    ours = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask, causal, K ** -0.5), q, k, v, w)
    ref = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation="xla"), q, k, v, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_xla_attention_in_bfloat16_is_as_close_to_float32_as_jax():
    q, k, v, w = qkv()
    mask = same_segment_mask(SEGMENTS)
    exact = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask, True, K ** -0.5), q, k, v, w)[1]
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    ours = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask, True, K ** -0.5), *half, w)[1]
    jaxs = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True), *half, w)[1]

    def error(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
    for o, j, e in zip(ours, jaxs, exact):
        assert error(o, e) < 1.5 * error(j, e) + 1e-3, (error(o, e), error(j, e))


def test_a_query_row_with_nothing_visible_gives_zeros_and_finite_gradients():
    q, k, v, w = qkv()
    mask = same_segment_mask(SEGMENTS).at[:, :, 0].set(False)  # query 0 sees no key
    out = xla_attention(q, k, v, mask, False, K ** -0.5)
    assert not np.any(out[:, 0]) and np.all(np.isfinite(out))
    grads = value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask, False, K ** -0.5), q, k, v, w)[1]
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert not np.any(grads[0][:, 0])  # nothing flows back through the empty row


def test_packed_segments_tile_each_row_with_its_documents():
    segments = packed_segments(SEGMENTS, max_segments=3)
    np.testing.assert_array_equal(segments.starts_BM1, [[0, 5, 9, -1], [0, -1, -1, -1]])
    np.testing.assert_array_equal(segments.lengths_BM, [[5, 4, 3], [12, -1, -1]])
    assert bool(segments.fits)
    tight = packed_segments(SEGMENTS, max_segments=2)  # the padding run has no room
    assert not bool(tight.fits)
    np.testing.assert_array_equal(tight.lengths_BM, [[5, 4], [12, -1]])


def test_jax_still_has_the_cudnn_pieces_we_use():
    """The packed layout is reached through JAX's cuDNN module, not a public API: fail here,
    not on a GPU, when an upgrade renames it."""
    parameters = inspect.signature(cudnn_fmha.dot_product_attention).parameters
    assert {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type",
            "qkv_layout"} <= set(parameters)
    assert cudnn_fmha.MaskType.PADDING_CAUSAL
    assert cudnn_fmha._dot_product_attention_fwd_p_wrapper.name == CUDNN_FORWARD_PRIMITIVE


def attention_forwards(jaxpr) -> int:
    """How many times attention's forward runs in a traced program: each run tags its output
    once (the backward pass reads the output, it does not tag it)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "name" and eqn.params["name"] == OUTPUT_NAME
        count += sum(attention_forwards(sub) for sub in jex.core.jaxprs_in_params(eqn.params))
    return count


def gradient_program(*overrides, evaluate=True):
    """(the traced program of the loss's gradient, the gradient or None) for the tiny model."""
    parts = build_on(tiny_config(*overrides))
    params = parts.init_params(0)
    B, L = parts.cfg.data.batch_size, parts.cfg.data.seq_len
    ones = jnp.ones((B, L), jnp.int32)
    batch = {"tokens": ones, "segment_ids": ones,
             "positions": jnp.broadcast_to(jnp.arange(L), (B, L))}

    def loss(params):
        total, count = loss_terms(parts.graphdef, params, batch)[:2]
        return total / count

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    return jaxpr, jax.jit(jax.grad(loss))(params) if evaluate else None


def test_only_a_policy_keeping_attention_skips_its_forward_in_the_backward_pass():
    """Three unrolled layers: one attention forward each with `proj_attn` (as with no remat),
    two with `proj` and `full`; the gradients are the same."""
    unrolled = ("model.scan_layers=false", "model.num_layers=3")
    reference = None
    for remat, per_layer in (("none", 1), ("proj_attn", 1), ("proj", 2), ("full", 2)):
        jaxpr, grads = gradient_program(f"model.remat={remat}", *unrolled)
        assert attention_forwards(jaxpr) == per_layer * 3, remat
        reference = grads if reference is None else reference
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads, reference)


def test_scanned_layers_keep_attention_too():
    """One scanned body each way: the forward loop runs attention, the backward loop not."""
    assert attention_forwards(gradient_program("model.remat=proj_attn", evaluate=False)[0]) == 1
    assert attention_forwards(gradient_program("model.remat=proj", evaluate=False)[0]) == 2
