"""A run directory's config and parameters: restored without the optimizer state into any
layout, the latest or a given step, checked against the checksums saved with them."""

import jax
import numpy as np
import pytest
import yaml

from conftest import build_on, tiny_config
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.checkpoint.runs import restore_params, run_config
from pjit_llm.config import CheckpointConfig
from pjit_llm.errors import UserError


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory holding the initial state as checkpoints 1 and 3 (no training)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = tiny_config(f"train.run_dir={run}")
    parts = build_on(cfg, data=2, fsdp=2, tensor=2)
    state = parts.init_state()
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(parts.cfg.to_dict()))
    ckpts = Checkpoints(run / "checkpoints", CheckpointConfig())
    for step in (1, 3):
        ckpts.save(step, state, {}, parts.cfg)
    ckpts.close()
    return run, jax.tree.map(np.asarray, jax.device_get(state.params))


def test_parameters_restore_into_another_layout_without_the_optimizer(saved_run):
    run, params = saved_run
    cfg = run_config(run)
    assert cfg.train.run_dir == str(run)
    layout = build_on(cfg, fsdp=2, tensor=4).layout
    restored, step = restore_params(cfg, layout, None)
    assert step == 3  # the latest
    wq = restored["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == layout.spec(("layers", "embed", "heads", "head_dim"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, params)
    assert restore_params(cfg, layout, 1)[1] == 1


def test_missing_runs_and_steps_are_refused(saved_run, tmp_path):
    run, _ = saved_run
    with pytest.raises(UserError, match="is not a run directory"):
        run_config(tmp_path)
    cfg = run_config(run)
    with pytest.raises(UserError, match="no checkpoint for step 2 in .*; it has 1, 3"):
        restore_params(cfg, build_on(cfg).layout, 2)
    with pytest.raises(UserError, match="model.mlp_dim=256 does not|do not match the model config"):
        wider = run_config(run, ["model.mlp_dim=256"])
        restore_params(wider, build_on(wider).layout, None)
