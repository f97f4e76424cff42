"""Orbax checkpoints in this process: state and data position restore straight into the
layout of another mesh and device count; a checkpoint saved before checksums restores
unchecked; a change of a shape-fixing field is refused."""

import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import build_on, tiny_config
from pjit_llm.checkpoint import checksums
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.config import CheckpointConfig
from pjit_llm.errors import UserError


def _batch():
    rng = np.random.default_rng(0)
    return {"tokens": ((rng.integers(0, 256, (16, 1)) + np.arange(32)) % 256).astype(np.int32),
            "segment_ids": np.ones((16, 32), np.int32),
            "positions": np.tile(np.arange(32, dtype=np.int32), (16, 1))}


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
    parts = build_on(tiny_config(), data=2, fsdp=2, tensor=2)
    put = lambda b: jax.device_put(b, parts.batch_sharding)  # noqa: E731
    cfg = parts.cfg
    state, _ = parts.train_step(parts.init_state(), put(_batch()))
    position = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(position)
    ckpts = Checkpoints(tmp_path, CheckpointConfig())
    ckpts.save(1, state, position.get_state(), cfg)
    ckpts.wait()
    saved = jax.tree.map(np.asarray, state)
    _, metrics = parts.train_step(state, put(_batch()))  # donates `state`
    next_loss = float(metrics["loss"])
    for shape in ({"fsdp": 4}, None):  # on 4 devices, on 1
        parts = build_on(tiny_config(), shape)
        put = lambda b: jax.device_put(b, parts.batch_sharding)  # noqa: E731
        target_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
        restored, step = Checkpoints(tmp_path, CheckpointConfig()).restore(
            parts.abstract_state, target_iter, parts.cfg)

        assert step == 1 and next(target_iter) == 1  # the data position came back too
        for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                           jax.tree.leaves(parts.shardings)):
            assert a.sharding == s  # restored straight into the target layout
            np.testing.assert_array_equal(np.asarray(a), b)
        _, metrics = parts.train_step(restored, put(_batch()))
        np.testing.assert_allclose(float(metrics["loss"]), next_loss, rtol=2e-5)
    # A checkpoint saved before checksums existed restores unchecked.
    shutil.rmtree(tmp_path / "1" / checksums.ITEM)
    restored, step = Checkpoints(tmp_path, CheckpointConfig()).restore(
        parts.abstract_state, target_iter, parts.cfg)
    assert step == 1
    # A field that fixes parameter shapes may not change.
    wider = build_on(tiny_config("model.mlp_dim=256"))
    with pytest.raises(UserError, match="step 1: model.mlp_dim was 128 and is now 256"):
        Checkpoints(tmp_path, CheckpointConfig()).restore(wider.abstract_state, target_iter,
                                                          wider.cfg)


def test_saving_replicated_arrays_compiles_nothing(tmp_path):
    """A replicated array is written whole by one replica: no XLA program per device to cut
    it into one slice per replica (Orbax's CPU default), which cost a process's first save
    65 compilations on 8 devices."""
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    tree = {"w": jax.device_put(np.arange(24 * 7, dtype=np.float32).reshape(24, 7),
                                NamedSharding(mesh, P()))}  # a shape no other test saves
    checksums.compute(tree)  # compiled here, not counted below
    compiles = []

    def count(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":  # also cache hits
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        ckpts = Checkpoints(tmp_path, CheckpointConfig())
        ckpts.save(1, tree, iter(grain.MapDataset.range(10).to_iter_dataset()).get_state(),
                   tiny_config())
        ckpts.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    restored = ocp.StandardCheckpointer().restore(tmp_path / "1" / "state")
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
