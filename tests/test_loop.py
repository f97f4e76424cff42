"""The training loop in this process: a step that cannot fit is refused, a run starts from
another run's parameters, and a non-finite loss stops the run keeping the last good
checkpoint."""

import jax
import numpy as np
import pytest

from conftest import TINY, build_on
from hf_models import LLAMA, write_hf
from pjit_llm import perf
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.errors import UserError
from pjit_llm.interop import hf as convert
from pjit_llm.training.build import Components
from pjit_llm.training.loop import _init_from, report_compiled


def test_a_step_that_cannot_fit_is_refused(monkeypatch):
    compiled = jax.jit(lambda a: a * 2).lower(jax.numpy.ones((256, 256))).compile()
    report_compiled(compiled, 0.1, 1e9)  # no limit on CPU: reported, not refused
    monkeypatch.setattr(perf, "device_memory_limit", lambda device: 1024)
    with pytest.raises(UserError, match="needs .* per device but the device has 1 KiB"):
        report_compiled(compiled, 0.1, 1e9)


def test_training_refuses_a_step_that_cannot_fit_before_making_its_state(monkeypatch, tmp_path):
    """The step is compiled for the abstract state: a state that alone would not fit the device
    is refused in one line, not an out-of-memory error while it is made."""
    from pjit_llm.train import main as train
    monkeypatch.setattr(perf, "device_memory_limit", lambda device: 1024)

    def init_state(self, seed=None):
        raise AssertionError("the state was made before the step was refused")

    monkeypatch.setattr(Components, "init_state", init_state)
    with pytest.raises(UserError, match="needs .* per device but the device has 1 KiB"):
        train([*TINY, "data.num_workers=0", "train.eval_batches=1", "train.eval_every=0",
               "train.sample_tokens=0", f"train.run_dir={tmp_path / 'run'}"])


def test_init_from_restores_the_parameters_with_a_fresh_optimizer(tmp_path):
    write_hf(tmp_path / "hf", LLAMA)  # an imported model: parameters alone, as step 0
    base = convert.import_hf(tmp_path / "hf", tmp_path / "base")
    cfg = run_config(base, [f"train.init_from={base}", "train.run_dir=elsewhere"])
    parts = build_on(cfg, data=2, fsdp=2, tensor=2)
    abstract_state = parts.abstract_state
    state = _init_from(parts)
    imported, _ = restore_params(run_config(base), parts.layout, None)
    assert int(state.step) == 0
    for a, b, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(imported),
                          jax.tree.leaves(abstract_state.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == want.sharding
    assert all(not np.asarray(m).any() for m in jax.tree.leaves(state.opt_state))
    other = run_config(base, [f"train.init_from={base}", "model.num_layers=3"])
    with pytest.raises(UserError, match="has model.num_layers=2 but this run has 3"):
        _init_from(build_on(other, data=2, fsdp=2, tensor=2))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from pjit_llm.train import main as train
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train([*TINY, "train.steps=20", "checkpoint.every=1", "optimizer.lr=1e30",
               "optimizer.clip_norm=0", "data.num_workers=0", "train.log_every=1",
               "train.eval_every=0", "train.sample_tokens=0", "train.eval_batches=1",
               f"train.run_dir={run}"])
    line = str(e.value)
    assert "\n" not in line
    assert "the training loss was not finite at step" in line and "the last good checkpoint" in line
    bad = int(line.split("not finite at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert max(saved) < bad
