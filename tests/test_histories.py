"""fp8 amax histories (model.fp8_scaling=delayed) across checkpoints, with real Orbax on disk:
a delayed run resumes exactly and restores its histories replicated onto another mesh; a
checkpoint saved under current scaling (or with another history length) resumes with empty
histories, and a delayed one under current scaling drops them; readers of a run (evaluate,
generate, export, init_from) run current scaling and never read them."""

import dataclasses

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import build_on, tiny_config
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.checkpoint.run_dir import run_config, write_config
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.config import CheckpointConfig
from pjit_llm.models.fp8_state import is_history, is_history_path, split_histories
from pjit_llm.placement import place
from pjit_llm.training.loop import _init_from, _resume_or_init
from test_step import random_rows

FP8 = ("model.matmul=fp8",)
DELAYED = (*FP8, "model.fp8_scaling=delayed", "model.fp8_amax_history=4")


def _batches(parts, count=4):
    cfg = parts.cfg
    B, rows = cfg.data.batch_size, random_rows(cfg)
    return [{k: jax.device_put(v[i * B:(i + 1) * B], parts.batch_sharding)
             for k, v in rows.items()} for i in range(count)]


def _position():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _histories(params) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(params) if is_history(v)}


def _trained(cfg, directory, steps=2, mesh=None):
    """The state after `steps` steps of `cfg`, saved at its last step into `directory`."""
    parts = build_on(cfg, mesh)
    state = parts.init_state()
    for batch in _batches(parts, steps):
        state, _ = parts.train_step(state, batch)
    ckpts = Checkpoints(directory, CheckpointConfig())
    ckpts.save(steps, state, _position().get_state(), parts.cfg)
    ckpts.close()
    return state


def _resume(cfg, directory, mesh=None):
    parts = build_on(cfg, mesh)
    return parts, _resume_or_init(parts, Checkpoints(directory, CheckpointConfig()), _position())


def test_every_history_lies_on_a_path_that_names_it():
    """Saved trees keep no variable types: the histories are known by their path."""
    params = build_on(tiny_config(*DELAYED)).abstract_state.params
    for path, v in nnx.to_flat_state(params):
        assert is_history_path(tuple(map(str, path))) == is_history(v), path


def test_a_delayed_run_resumes_exactly_and_onto_another_mesh(tmp_path):
    cfg = tiny_config(*DELAYED)
    state = _trained(cfg, tmp_path)
    saved = jax.tree.map(np.asarray, jax.device_get(state))
    parts = build_on(cfg)
    later = _batches(parts)[2:]
    for batch in later:
        state, metrics = parts.train_step(state, batch)
    uninterrupted = jax.tree.map(np.asarray, jax.device_get(state))

    parts, state = _resume(cfg, tmp_path)
    assert all((h[..., :2] > 0).all() and not h[..., 2:].any()
               for h in _histories(state.params).values())  # two steps' amaxes came back
    for batch in later:
        state, _ = parts.train_step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, jax.device_get(state)),
                 uninterrupted)

    parts, state = _resume(cfg, tmp_path, {"data": 2, "fsdp": 2, "tensor": 2})
    restored = _histories(state.params)
    for path, v in nnx.to_flat_state(state.params):
        if is_history(v):
            assert v.get_value().sharding.spec == P(None, None, None)  # replicated
            np.testing.assert_array_equal(restored[path], _histories(saved.params)[path])


def test_a_current_scaling_checkpoint_resumes_delayed_with_empty_histories(tmp_path, capsys):
    state = _trained(tiny_config(*FP8), tmp_path)
    saved = jax.tree.map(np.asarray, jax.device_get((state.params, state.opt_state)))
    parts, state = _resume(tiny_config(*DELAYED), tmp_path)
    assert "7 amax histories (e.g. blocks/attn/fp8/attn_out) start empty" in capsys.readouterr().out
    weights, histories = split_histories(state.params)
    assert len(_histories(histories)) == 7 and not any(map(np.any, _histories(histories).values()))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((weights, state.opt_state)), saved)
    state, metrics = parts.train_step(state, _batches(parts, 1)[0])
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3
    assert all(h[..., 0].all() for h in _histories(state.params).values())


def test_a_delayed_checkpoint_resumes_under_current_scaling_without_its_histories(tmp_path):
    state = _trained(tiny_config(*DELAYED), tmp_path)
    weights = jax.tree.map(np.asarray, jax.device_get(split_histories(state.params)[0]))
    parts, state = _resume(tiny_config(*FP8), tmp_path)
    assert not _histories(state.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), weights)
    parts.train_step(state, _batches(parts, 1)[0])


def test_histories_of_another_length_start_empty(tmp_path, capsys):
    _trained(tiny_config(*DELAYED), tmp_path)
    _, state = _resume(tiny_config(*DELAYED, "model.fp8_amax_history=8"), tmp_path)
    assert "start empty" in capsys.readouterr().out
    assert all(h.shape[-1] == 8 and not h.any() for h in _histories(state.params).values())


def test_readers_of_a_delayed_run_scale_currently_and_init_from_starts_empty(tmp_path):
    """evaluate, generate and export open a run with run_config: current scaling, the
    parameters without histories. A run started from it (train.init_from) under delayed
    scaling takes its weights and starts its histories empty."""
    cfg = dataclasses.replace(tiny_config(*DELAYED), train=dataclasses.replace(
        tiny_config().train, run_dir=str(tmp_path / "source")))
    state = _trained(cfg, tmp_path / "source" / "checkpoints")
    write_config(tmp_path / "source", cfg)
    reader = run_config(tmp_path / "source")
    assert reader.model.fp8_scaling == "current" and reader.model.matmul == "fp8"
    placed = place(reader)
    params, step = restore_params(reader, placed.layout, None)
    weights = jax.tree.map(np.asarray, jax.device_get(split_histories(state.params)[0]))
    assert step == 2 and not _histories(params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), weights)
    batch = _batches(placed, 1)[0]
    current = float(placed.eval_step(params, batch)["loss_sum"])
    # The training run's own evaluation multiplies with its stored scales (and, a function of
    # the parameters alone, updates nothing): measured within 3e-5 of current scaling here.
    training = build_on(cfg)
    stored = float(training.eval_step(state.params, _batches(training, 1)[0])["loss_sum"])
    assert stored != current and stored == pytest.approx(current, rel=1e-3)

    started = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, init_from=str(tmp_path / "source"), run_dir=str(tmp_path / "new")))
    state = _init_from(build_on(started))
    assert int(state.step) == 0 and len(_histories(state.params)) == 7
    assert not any(map(np.any, _histories(state.params).values()))
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(split_histories(state.params)[0]), weights)
    assert all(v.dtype == np.float32 for v in _histories(state.params).values())


def test_init_from_keeps_histories_in_float32_under_bfloat16_parameters(tmp_path):
    source = tiny_config(*FP8, "model.param_dtype=bfloat16")
    cfg = dataclasses.replace(source, train=dataclasses.replace(
        source.train, run_dir=str(tmp_path / "source")))
    _trained(cfg, tmp_path / "source" / "checkpoints", steps=1)
    write_config(tmp_path / "source", cfg)
    started = tiny_config(*DELAYED, "model.param_dtype=bfloat16",
                          f"train.init_from={tmp_path / 'source'}", f"train.run_dir={tmp_path}/new")
    parts = build_on(started)
    state = _init_from(parts)
    assert all(v.dtype == np.float32 for v in _histories(state.params).values())
    parts.train_step(state, _batches(parts, 1)[0])
