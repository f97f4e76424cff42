"""Context parallelism: sequences sharded over `context` train exactly like one device, alone
and with data, FSDP, tensor and pipeline stages, on packed rows; no token sees a later
position or another segment across a shard boundary with the rows load-balanced; activations
and attention inputs are sharded over `context`; the step's memory falls as 1/context; the
impossible is refused in one line; generation works on a context mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import build_on, tiny_config
from pjit_llm.errors import UserError
from pjit_llm.inference.generator import Generator, Sampling
from pjit_llm.parallel.context import balanced_order
from pjit_llm.training.measure import step_memory
from test_step import random_rows, run_steps


@pytest.fixture(scope="module")
def reference():
    return run_steps(tiny_config(), None)


# The TINY rows pack 1-3 documents each (random_rows), so every comparison crosses segments.
MESHES = {
    "context-2": ((), {"context": 2}),
    "context-8": ((), {"context": 8}),
    "context-2 x data-2 x tensor-2": ((), {"context": 2, "data": 2, "tensor": 2}),
    "context-4 x fsdp-2 unbalanced, chunked loss, accumulation": (
        ("train.context_load_balance=false", "model.loss_chunk=8", "train.grad_accum=2"),
        {"context": 4, "fsdp": 2}),
    # GPipe keeps the stacked layers in model order, so they compare as they are.
    "context-2 x stage-2 x fsdp-2": (("train.microbatches=2",), {"context": 2, "stage": 2,
                                                                 "fsdp": 2}),
}


@pytest.mark.parametrize("mesh", MESHES)
def test_every_context_mesh_trains_like_one_device(reference, mesh):
    overrides, sizes = MESHES[mesh]
    losses, params = run_steps(tiny_config(*overrides), sizes)
    ref_losses, ref_params = reference
    assert ref_losses[-1] < ref_losses[0]  # it is learning, so the comparison means something
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params,
                 ref_params)


def test_balanced_order_gives_each_shard_an_early_and_a_late_chunk():
    order = balanced_order(16, 4)  # 8 chunks of 2
    assert order.reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11],
                                            [6, 7, 8, 9]]
    assert sorted(order.tolist()) == list(range(16))


def test_no_token_sees_a_later_position_or_another_segment_across_shards():
    """Change one token; with 4 shards of 8 load-balanced chunks of 4 positions, the hidden
    states of earlier positions and of other segments stay exactly as
    they were, and those after it in its segment change."""
    parts = build_on(tiny_config("model.num_layers=1"), context=4)
    assert parts.balance == 4
    params = parts.init_state().params
    L = parts.cfg.data.seq_len  # 32
    seg = np.repeat([1, 2, 3], [10, 12, 10])[None].repeat(2, 0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(12), np.arange(10)])[None].repeat(2, 0)
    tokens = np.arange(2 * L, dtype=np.int32).reshape(2, L) % 200

    @jax.jit
    def hidden_in_row_order(tokens):
        # What loss_terms hands the model: the rows reordered, and each token's original slot.
        model = nnx.merge(parts.graphdef, params)
        order = balanced_order(L, parts.balance)
        slots = jnp.broadcast_to(jnp.asarray(order), tokens.shape)
        h = model.hidden(tokens[:, order], jnp.asarray(seg)[:, order],
                         jnp.asarray(positions, jnp.int32)[:, order], slots)
        return h[:, np.argsort(order)]

    before = np.asarray(hidden_in_row_order(tokens))
    # Shard s holds chunks s and 7-s: position 12 lies on shard 3 and the rest of its segment
    # (up to 21) partly on shard 2; 28 on shard 0, after its segment's 24-27 on shard 1.
    for changed in (4, 9, 12, 28):
        after = np.asarray(hidden_in_row_order(_with(tokens, changed)))
        same_seg = seg[0] == seg[0, changed]
        blind = (np.arange(L) < changed) | ~same_seg
        np.testing.assert_array_equal(after[0, blind], before[0, blind])
        assert np.all(np.abs(after[0, ~blind] - before[0, ~blind]).max(axis=-1) > 0), changed
        np.testing.assert_array_equal(after[1], before[1])  # the other row


def _with(tokens, i):
    """`tokens` with row 0's token i changed."""
    out = tokens.copy()
    out[0, i] = 250
    return out


def test_activations_and_attention_inputs_are_sharded_over_context():
    parts = build_on(tiny_config(), context=4, tensor=2)
    params = parts.init_state().params
    rows = random_rows(parts.cfg, n_rows=parts.cfg.data.batch_size)
    batch = {k: jax.device_put(v, parts.batch_sharding) for k, v in rows.items()}
    assert batch["tokens"].sharding.spec == P(None, "context")

    @jax.jit
    def pieces(params, batch):
        model = nnx.merge(parts.graphdef, params)
        x_BLD = model._embed(batch["tokens"])
        mask_B1LS = model._mask(batch["segment_ids"], None, model.layout)
        h_BLD = model.hidden(batch["tokens"], batch["segment_ids"], batch["positions"])
        return x_BLD, mask_B1LS, h_BLD, model.logits(h_BLD)

    x_BLD, mask_B1LS, h_BLD, logits_BLV = pieces(params, batch)
    assert x_BLD.sharding.spec[1] == "context" and h_BLD.sharding.spec[1] == "context"
    assert mask_B1LS.sharding.spec[2] == "context"  # the queries' axis of the mask
    assert tuple(logits_BLV.sharding.spec)[1:] == ("context", "tensor")
    # The attention's keys and values are gathered whole over `context`: the compiled step
    # gathers (B, L, G/tensor, K) = (16, 32, 2, 8) blocks.
    hlo = parts.eval_step.lower(params, batch).compile().as_text()
    assert any("all-gather(" in line and "f32[16,32,2,8]" in line.split("=")[1]
               for line in hlo.splitlines() if "=" in line)


def test_step_memory_falls_as_one_over_context():
    long = ("model.num_layers=1", "data.seq_len=1024", "model.max_len=1024", "data.batch_size=1",
            "mesh.data=1")
    one = step_memory(tiny_config(*long))["temporaries"]
    four = step_memory(tiny_config(*long, "mesh.context=4"))["temporaries"]
    assert four < one / 4 * 1.15, (one, four)


@pytest.mark.parametrize("overrides, mesh, message", [
    (("data.seq_len=36", "model.max_len=64"), {"context": 4},
     "data.seq_len=36 is not divisible by 2 x mesh.context=4"),
    (("data.seq_len=36", "model.max_len=64", "train.context_load_balance=false"), {"context": 8},
     "data.seq_len=36 is not divisible by mesh.context=8"),
    (("model.loss_chunk=2",), {"context": 4},
     "model.loss_chunk=2 is not divisible by mesh.context=4"),
    (("model.attention=cudnn", "model.dtype=bfloat16"), {"context": 2},
     "model.attention=cudnn cannot be used: a sequence split into 2 context shards"),
])
def test_impossible_context_runs_are_refused_in_one_line(overrides, mesh, message):
    with pytest.raises(UserError) as e:
        build_on(tiny_config(*overrides), mesh)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_generation_on_a_context_mesh_matches_one_device():
    """The decode step keeps the cache's length whole: context shards decode the same rows."""
    def generate(mesh):
        parts = build_on(tiny_config(), mesh)
        params = parts.init_state().params
        generator = Generator(parts.model, parts.layout, Sampling())
        return generator.generate(params, [np.arange(5), np.arange(3) + 7], 6, None)

    assert generate({"context": 4, "tensor": 2}) == generate(None)
