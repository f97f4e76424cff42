"""A run directory's config and parameters: restored without the optimizer state into any
layout, the latest or a given step, checked against the checksums saved with them; a run's
config followed to where the run directory now is."""

from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from conftest import build_on, tiny_config
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.checkpoint.run_dir import run_config, train_config
from pjit_llm.checkpoint.runs import restore_params
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


def test_a_runs_own_config_locates_the_run_where_it_now_lies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorded = tiny_config("train.run_dir=old/run", "checkpoint.directory=old/run/ckpt")
    run = Path("new/run")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(recorded.to_dict()))
    (run / "metrics.jsonl").write_text("")

    def where(cfg):
        return cfg.train.run_dir, cfg.checkpoint.directory

    assert where(train_config("new/run/config.yaml")) == ("new/run", "new/run/ckpt")
    assert where(run_config(run)) == ("new/run", "new/run/ckpt")  # evaluate, generate, export
    # train.run_dir given: a new run from this config, its checkpoints inside it too.
    assert where(train_config("new/run/config.yaml", ["train.run_dir=c"])) == ("c", "c/ckpt")
    assert where(train_config("new/run/config.yaml", ["checkpoint.directory=x"])) == ("new/run", "x")
    # Checkpoints kept outside the run directory (shared storage) stay where they are.
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config(
        "train.run_dir=old/run", "checkpoint.directory=/shared/ckpt").to_dict()))
    assert where(train_config(str(run.absolute() / "config.yaml"))) == (
        str(run.absolute()), "/shared/ckpt")
    # An unmoved run keeps its file's train.run_dir as written, relative or not.
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config("train.run_dir=new/run").to_dict()))
    assert where(train_config(str(run.absolute() / "config.yaml"))) == ("new/run", "")
    # A config.yaml that is not in a run directory is an ordinary config file.
    (run / "metrics.jsonl").unlink()
    (run / "config.yaml").write_text(yaml.safe_dump(recorded.to_dict()))
    assert where(train_config("new/run/config.yaml")) == ("old/run", "old/run/ckpt")
