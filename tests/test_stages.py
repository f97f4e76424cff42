"""Pipeline stages: every schedule, alone and with data, FSDP and tensor parallelism, trains
exactly like one device; the stacked layers are sharded over `stage`; checkpoints hold them
in model order, so a run moves between meshes with and without stages; impossible schedules
are refused in one line."""

import grain
import jax
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.config import CheckpointConfig
from pjit_llm.errors import UserError
from pjit_llm.parallel.layout import bytes_per_device
from pjit_llm.parallel.stages import Pipeline
from test_step import random_rows

EIGHT = "model.num_layers=8"  # divides into 2, 4 and 8 stages, and 2 x 2 and 4 x 2 blocks


def run_steps(overrides, mesh, steps=3):
    """(losses, gradient norms, parameters in model order) after `steps` train steps."""
    parts = build_on(tiny_config(EIGHT, *overrides), mesh)
    state = parts.init_state()
    rows, B = random_rows(parts.cfg), parts.cfg.data.batch_size
    losses, norms = [], []
    for step in range(steps):
        batch = {k: jax.device_put(v[step * B:(step + 1) * B], parts.batch_sharding)
                 for k, v in rows.items()}
        state, metrics = parts.train_step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    params = jax.tree.map(np.asarray, jax.device_get(parts.to_model_order(state.params)))
    return np.array(losses), np.array(norms), params


@pytest.fixture(scope="module")
def reference():
    return run_steps((), None)


# 2, 4 and 8 stages; GPipe and circular; alone and with data, FSDP and tensor parallelism,
# gradient accumulation and the chunked loss.
SCHEDULES = {
    "gpipe-8": (("train.microbatches=8",), {"stage": 8}),
    "circular-4x2": (("train.pipeline_repeats=2", "train.microbatches=4"), {"stage": 4}),
    "gpipe-2 x data-2 x tensor-2": (("train.microbatches=4",),
                                    {"stage": 2, "data": 2, "tensor": 2}),
    "circular-2x2 x fsdp-2 x tensor-2, accumulation, chunked loss": (
        ("train.pipeline_repeats=2", "train.microbatches=2", "train.grad_accum=2",
         "model.loss_chunk=8"), {"stage": 2, "fsdp": 2, "tensor": 2}),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_trains_like_one_device(reference, schedule):
    overrides, mesh = SCHEDULES[schedule]
    losses, norms, params = run_steps(overrides, mesh)
    ref_losses, ref_norms, ref_params = reference
    assert ref_losses[-1] < ref_losses[0]  # it is learning, so the comparison means something
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params,
                 ref_params)


def test_circular_layer_order_round_trips():
    pipeline = Pipeline(stages=2, microbatches=4, repeats=2)
    # Stage 0 holds blocks 0 and 2 of two layers each, stage 1 blocks 1 and 3.
    assert pipeline.layer_order(8).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    tree = {"blocks": {"w": np.arange(8)}, "embed": np.arange(8)}
    staged = pipeline.to_stage_order(tree)
    assert staged["blocks"]["w"].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert staged["embed"].tolist() == list(range(8))  # only the stacked layers move
    assert pipeline.to_model(staged)["blocks"]["w"].tolist() == list(range(8))
    assert Pipeline(4, 8).layer_order(8).tolist() == list(range(8))  # GPipe: contiguous


def test_bubble_follows_the_formula():
    assert Pipeline(4, 8).bubble == pytest.approx(3 / 11)
    assert Pipeline(4, 8, repeats=2).bubble == pytest.approx(3 / 19)
    assert Pipeline(4, 8, repeats=2).iterations == 19
    assert "circular x2: 4 stages, 8 micro-batches, 19 iterations, bubble 15.8%" in \
        Pipeline(4, 8, repeats=2).describe()


@pytest.mark.parametrize("stages", [2, 8])
def test_stacked_layers_are_sharded_over_stages(stages):
    one = build_on(tiny_config(EIGHT)).init_state()
    parts = build_on(tiny_config(EIGHT, "train.microbatches=8"), stage=stages)
    state = parts.init_state()
    stacked = [a for path, a in jax.tree_util.tree_leaves_with_path(state)
               if "'blocks'" in jax.tree_util.keystr(path)]
    assert len(stacked) == 3 * len(jax.tree.leaves(state.params["blocks"]))  # params, 2 moments
    assert all(a.sharding.spec[0] == "stage" for a in stacked)
    blocks, blocks_one = state.params["blocks"], one.params["blocks"]
    assert bytes_per_device(blocks) * stages == bytes_per_device(blocks_one)
    # The embedding and final norm are replicated over stages, so the whole state falls by a
    # little less than 1/S: by exactly 1/S in its layers.
    total, total_one = bytes_per_device(state), bytes_per_device(one)
    rest = total_one - bytes_per_device(one.params["blocks"]) * 3  # params + two moments
    assert total == pytest.approx(total_one / stages + rest * (1 - 1 / stages), rel=0.01)


def _batch(parts, step=0):
    rows, B = random_rows(parts.cfg), parts.cfg.data.batch_size
    return {k: jax.device_put(v[step * B:(step + 1) * B], parts.batch_sharding)
            for k, v in rows.items()}


CIRCULAR = (EIGHT, "train.pipeline_repeats=2", "train.microbatches=4")


@pytest.mark.parametrize("direction", ["from stages", "onto stages"])
def test_checkpoints_move_between_meshes_with_and_without_stages(tmp_path, direction):
    staged = ({"stage": 4}, CIRCULAR)
    plain = [({"fsdp": 8}, (EIGHT,)), (None, (EIGHT,))]
    first, targets = (staged, plain) if direction == "from stages" else (plain[0], [staged])
    parts = build_on(tiny_config(*first[1]), first[0])
    state, _ = parts.train_step(parts.init_state(), _batch(parts))
    position = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpts = Checkpoints(tmp_path, CheckpointConfig())
    ckpts.save(1, parts.to_model_order(state), position.get_state(), parts.cfg)
    ckpts.wait()
    _, metrics = parts.train_step(state, _batch(parts, 1))
    next_loss = float(metrics["loss"])
    for mesh, overrides in targets:
        other = build_on(tiny_config(*overrides), mesh)
        restored, step = Checkpoints(tmp_path, CheckpointConfig()).restore(
            other.abstract_state, iter(grain.MapDataset.range(10).to_iter_dataset()), other.cfg)
        _, metrics = other.train_step(other.to_run_order(restored), _batch(other, 1))
        assert step == 1
        assert float(metrics["loss"]) == pytest.approx(next_loss, rel=1e-5), mesh


@pytest.mark.parametrize("overrides, mesh, message", [
    (("model.num_layers=6",), {"stage": 4},
     "model.num_layers=6 is not divisible by mesh.stage=4 x train.pipeline_repeats=1"),
    ((EIGHT, "train.pipeline_repeats=4", "train.microbatches=4"), {"stage": 4},
     "model.num_layers=8 is not divisible by mesh.stage=4 x train.pipeline_repeats=4"),
    ((EIGHT, "train.microbatches=2"), {"stage": 4},
     "train.microbatches=2 is fewer than mesh.stage=4"),
    ((EIGHT, "train.microbatches=6"), {"stage": 2},
     "a batch of 16 sequences (data.batch_size / train.grad_accum) cannot be cut into "
     "train.microbatches=6"),
    ((EIGHT, "train.microbatches=8"), {"stage": 2, "data": 4},
     "a pipeline micro-batch of 2 sequences is not divisible by its 4 batch shards"),
    ((EIGHT, "mesh.rules.layers=null"), {"stage": 2},
     "mesh.stage=2 runs the layers as pipeline stages, which needs mesh.rules.layers=[stage]"),
    ((EIGHT, "mesh.rules.mlp=[stage]"), {"stage": 2},
     "mesh.rules.mlp names stage, which the pipeline stages own"),
])
def test_impossible_schedules_are_refused_in_one_line(overrides, mesh, message):
    with pytest.raises(UserError) as e:
        build_on(tiny_config(*overrides), mesh)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_without_stages_the_pipeline_keys_change_nothing():
    parts = build_on(tiny_config("train.microbatches=3", "train.pipeline_repeats=2"), fsdp=8)
    assert parts.pipeline is None
