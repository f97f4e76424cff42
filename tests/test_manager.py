"""Orbax checkpoints in this process: state and data position restore straight into the
layout of another mesh and device count; a checkpoint saved before checksums restores
unchecked; a change of a shape-fixing field is refused; a checkpoint is set aside only when
its files show damage, and any other restore failure stops in one line moving nothing."""

import errno
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


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """A checkpoint directory holding steps 10 and 20 (distinct states), and the components
    of the tiny model on one device."""
    directory = tmp_path_factory.mktemp("two_saves") / "checkpoints"
    parts = build_on(tiny_config())
    state = parts.init_state()
    position = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpts = Checkpoints(directory, CheckpointConfig())
    for step in (10, 20):
        state, _ = parts.train_step(state, jax.device_put(_batch(), parts.batch_sharding))
        next(position)
        ckpts.save(step, state, position.get_state(), parts.cfg)
    ckpts.close()
    return directory, parts


@pytest.fixture
def copied(two_saves, tmp_path):
    directory, parts = two_saves
    shutil.copytree(directory, tmp_path / "checkpoints")
    return tmp_path / "checkpoints", parts


def _restore(directory, parts):
    return Checkpoints(directory, CheckpointConfig()).restore(
        parts.abstract_state, iter(grain.MapDataset.range(100).to_iter_dataset()), parts.cfg)


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("_"))


@pytest.mark.parametrize("error", [
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                               "1.50GiB."),
    OSError(errno.EIO, "Input/output error", "state/manifest.ocdbt"),
    TypeError("restore() got an unexpected keyword argument 'shardings'"),
], ids=["out_of_memory", "io_error", "program_error"])
def test_a_restore_failure_that_is_not_damage_moves_nothing(copied, monkeypatch, error):
    directory, parts = copied
    restore = ocp.CheckpointManager.restore

    def failing(self, step, *args, **kwargs):
        if "state" in kwargs.get("args", {}):
            raise error
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
    with pytest.raises(UserError) as raised:
        _restore(directory, parts)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot restore checkpoint step 20 in {directory} "
                              f"({type(error).__name__}: {str(error).splitlines()[0]})")
    assert "left in place" in message
    assert _names(directory) == ["10", "20"]


def _data_files(step_dir):
    return sorted((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
                  key=lambda f: f.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _flip_first_bytes(path, count=16):
    raw = bytearray(path.read_bytes())
    raw[:count] = bytes(b ^ 0xFF for b in raw[:count])
    path.write_bytes(bytes(raw))


DAMAGE = {
    "truncated_data": lambda step: [_truncate(f) for f in _data_files(step)],
    "deleted_data": lambda step: _data_files(step)[-1].unlink(),
    "flipped_compressed_header": lambda step: _flip_first_bytes(_data_files(step)[-1]),
    "deleted_array_metadata": lambda step: (step / "state" / "_METADATA").unlink(),
    "corrupt_config": lambda step: _truncate(step / "config" / "metadata"),
    "deleted_state": lambda step: shutil.rmtree(step / "state"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_files_are_set_aside_and_the_previous_checkpoint_used(copied, kind, capsys):
    directory, parts = copied
    DAMAGE[kind](directory / "20")
    restored, step = _restore(directory, parts)
    assert step == 10 and int(restored.step) == 1
    names = _names(directory)
    assert names[0] == "10" and names[1].startswith("20.unreadable-") and len(names) == 2
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "checkpoint step 20" in warning[0] and "moved aside" in warning[0]


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
