"""cuDNN's attention on a GPU: as close to a float32 reference as XLA's in bfloat16, forward
and backward, on the model's head shapes, with and without packed documents (a dense mask, or
the documents' offsets, or a batch too full for them); the same training steps either way; and
with model.remat=proj_attn no cuDNN forward kernel in the backward pass. Skipped elsewhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.models.attention_kernels import attend, packed_segments, same_segment_mask
from test_step import random_rows

pytestmark = pytest.mark.gpu  # cuDNN attention runs on NVIDIA GPUs only

B, L, H, G, K = 2, 2048, 32, 8, 64  # the Llama-3.2-1B heads, at a shorter length
SEGMENT_IDS = jnp.stack([jnp.where(jnp.arange(L) < 700, 1, jnp.where(jnp.arange(L) < 1900, 2, 0)),
                         jnp.ones(L, jnp.int32)]).astype(jnp.int32)


def run(q, k, v, mask, implementation, dtype):
    weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def loss(q, k, v):
        out = attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, True,
                     implementation)
        return (out.astype(jnp.float32) * weights).sum(), out.astype(jnp.float32)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [out, *grads]


def relative_error(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("documents", ["none", "dense mask", "offsets", "offsets overflow"])
def test_cudnn_is_as_close_to_float32_as_xla_in_bfloat16(documents):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, L, H, K))
    k, v = (jax.random.normal(key, (B, L, G, K)) for key in ks[1:])
    dense = None if documents == "none" else same_segment_mask(SEGMENT_IDS)
    cudnn_mask = {"none": None, "dense mask": dense,
                  "offsets": packed_segments(SEGMENT_IDS, 4),
                  "offsets overflow": packed_segments(SEGMENT_IDS, 2)}[documents]
    if documents.startswith("offsets"):
        assert bool(cudnn_mask.fits) == (documents == "offsets")
    reference = run(q, k, v, dense, "xla", jnp.float32)
    xla = run(q, k, v, dense, "xla", jnp.bfloat16)
    cudnn = run(q, k, v, cudnn_mask, "cudnn", jnp.bfloat16)
    for name, c, x, r in zip(("out", "dq", "dk", "dv"), cudnn, xla, reference):
        assert relative_error(c, r) < 2 * relative_error(x, r) + 2e-3, (
            name, relative_error(c, r), relative_error(x, r))


GPU_TINY = ("model.dtype=bfloat16", "model.attention=cudnn", "model.embed_dim=512",
            "model.num_heads=8", "model.num_kv_heads=4", "model.mlp_dim=1024", "data.seq_len=256")


def losses(*overrides, steps=3):
    cfg = tiny_config(*GPU_TINY, *overrides)
    parts = build_on(cfg)
    state = parts.init_state()
    rows = random_rows(cfg, n_rows=steps * cfg.data.batch_size)
    out = []
    for step in range(steps):
        batch = {name: jax.device_put(a[step * cfg.data.batch_size:(step + 1) * cfg.data.batch_size],
                                      parts.batch_sharding) for name, a in rows.items()}
        state, metrics = parts.train_step(state, batch)
        out.append(float(metrics["loss"]))
    return np.array(out)


def test_document_offsets_train_like_the_dense_mask():
    """Rows of 1-3 documents: offsets with room for them, and too little room (the dense
    fallback), give the dense mask's losses."""
    dense = losses("model.max_segments=0")
    np.testing.assert_allclose(losses("model.max_segments=4"), dense, rtol=2e-2)
    np.testing.assert_allclose(losses("model.max_segments=1"), dense, rtol=2e-2)


def cudnn_forward_calls(*overrides) -> int:
    cfg = tiny_config(*GPU_TINY, "model.scan_layers=false", "model.num_layers=3", *overrides)
    parts = build_on(cfg)
    tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), np.int32,
                                  sharding=parts.batch_sharding)
    text = parts.train_step.lower(parts.abstract_state, dict.fromkeys(
        ("tokens", "segment_ids", "positions"), tokens)).as_text()
    targets = re.findall(r"__cudnn\$fmha\w+", text)
    return sum(not t.endswith("Backward") for t in targets)


def test_keeping_attention_runs_no_cudnn_forward_in_the_backward_pass():
    assert cudnn_forward_calls("model.remat=proj_attn") == 3
    assert cudnn_forward_calls("model.remat=proj") == 6
