"""The Llama model: packed sequences stay apart, attention is causal, positions are relative,
rope scaling changes the function, grouped-query and untied shapes, bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjit_llm.models.layers import apply_rope, padded_vocab, rope_angles
from pjit_llm.models.llama.config import LlamaConfig as ModelConfig
from pjit_llm.models.llama.model import LlamaTransformer as Transformer

L = 32


def make_model(cfg, **kw):
    return Transformer(cfg.model, None, nnx.Rngs(params=0))


def logits(model, tokens, seg, pos):
    return np.asarray(model(jnp.asarray(tokens)[None], jnp.asarray(seg)[None],
                            jnp.asarray(pos)[None])[0])


def packed_row(split=12):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, L).astype(np.int32)
    seg = np.where(np.arange(L) < split, 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(L), np.arange(L) - split).astype(np.int32)
    return tokens, seg, pos


def test_no_attention_across_segment_boundaries(tiny):
    model = make_model(tiny())
    tokens, seg, pos = packed_row()
    base = logits(model, tokens, seg, pos)
    other = tokens.copy()
    other[:12] = (other[:12] + 7) % 256  # rewrite the whole first document
    changed = logits(model, other, seg, pos)
    np.testing.assert_allclose(changed[12:], base[12:], atol=1e-6)  # second document unmoved
    assert not np.allclose(changed[:12], base[:12], atol=1e-3)
    # Control: without segment ids the same rewrite does reach the second document, so the
    # assertion above would fail if the mask leaked.
    one_seg = np.ones(L, np.int32)
    leak = logits(model, other, one_seg, pos) - logits(model, tokens, one_seg, pos)
    assert np.abs(leak[12:]).max() > 1e-3


def test_attention_is_causal(tiny):
    model = make_model(tiny())
    tokens, seg, pos = packed_row(split=L)
    base = logits(model, tokens, seg, pos)
    later = tokens.copy()
    later[20:] = (later[20:] + 1) % 256
    np.testing.assert_allclose(logits(model, later, seg, pos)[:20], base[:20], atol=1e-6)


def test_a_document_reads_the_same_wherever_it_is_packed(tiny):
    model = make_model(tiny())
    tokens, seg, pos = packed_row(split=12)
    doc = tokens[12:]
    alone = logits(model, np.concatenate([doc, tokens[:12]]),
                   np.where(np.arange(L) < 20, 1, 2), np.where(np.arange(L) < 20, np.arange(L),
                                                               np.arange(L) - 20))
    np.testing.assert_allclose(logits(model, tokens, seg, pos)[12:], alone[:20], atol=2e-5)


def test_rope_preserves_norm_and_depends_on_relative_position():
    x = jax.random.normal(jax.random.key(0), (1, 2, 1, 8))
    y = jax.random.normal(jax.random.key(1), (1, 2, 1, 8))

    def score(p, q):
        sin, cos = rope_angles(jnp.array([[p, q]]), 8, 10000.0)
        a, b = apply_rope(x, sin, cos), apply_rope(y, sin, cos)
        return float(jnp.sum(a[0, 0] * b[0, 1])), a

    s1, rotated = score(3, 5)
    s2, _ = score(10, 12)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(x), rtol=1e-5)


def test_grouped_query_attention_and_untied_shapes(tiny):
    model = make_model(tiny("model.num_kv_heads=2", "model.tie_embeddings=false"))
    assert model.blocks.attn.wk.shape == (2, 64, 2, 8)
    assert model.unembed.shape == (64, 384)
    tokens, seg, pos = packed_row()
    assert logits(model, tokens, seg, pos).shape == (L, 384)


def test_vocab_padding():
    assert padded_vocab(257) == 384 and padded_vocab(256) == 256 and padded_vocab(50257) == 50304


def test_bfloat16_compute_keeps_float32_params(tiny):
    model = make_model(tiny("model.dtype=bfloat16"))
    assert model.embed.dtype == jnp.float32
    tokens, seg, pos = packed_row()
    out = model(jnp.asarray(tokens)[None], jnp.asarray(seg)[None], jnp.asarray(pos)[None])
    assert out.dtype == jnp.bfloat16


def test_rope_scaling_changes_the_function():
    """The scaled-rope imports of test_interop_hf.py would pass with scaling ignored if it
    changed nothing."""
    pos = jnp.arange(40)[None]
    plain = rope_angles(pos, 8, 500.0)[0]
    llama3 = ModelConfig(embed_dim=64, rope_theta=500.0, rope_scaling="llama3", rope_factor=8.0,
                         rope_original_max_len=16)
    assert np.abs(rope_angles(pos, 8, 500.0, llama3)[0] - plain).max() > 0.1

