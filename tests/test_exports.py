"""Exports: a checkpoint's parameters alone, in one dtype, with the model config beside them,
read back into the shardings of another mesh."""

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.checkpoint.exports import export_model, load_params, write_export
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.config import CheckpointConfig
from pjit_llm.errors import UserError


def test_export_reads_back_on_another_mesh_in_its_dtype(tmp_path):
    run = tmp_path / "run"
    parts = build_on(tiny_config(f"train.run_dir={run}"), data=2, fsdp=2, tensor=2)
    state = parts.init_state()
    ckpts = Checkpoints(run / "checkpoints", CheckpointConfig())
    ckpts.save(5, state, {}, parts.cfg)
    ckpts.close()
    out, step = write_export(parts.cfg, parts.layout, None, None, "bfloat16")
    assert (out, step) == (run / "export" / "step_5-bfloat16", 5)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left beside it
    layout = build_on(tiny_config(), fsdp=4, tensor=2).layout
    model, params = load_params(out, layout)
    assert model == parts.cfg.model.__class__(**{**parts.cfg.model.__dict__, "param_dtype": "bfloat16"})
    expected = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16),
                            jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
    assert params["blocks"]["attn"]["wq"].sharding.spec[1] == "fsdp"
    with pytest.raises(UserError, match="already exists; remove it or pass another --out"):
        write_export(parts.cfg, parts.layout, out, None, "float32")
    with pytest.raises(UserError, match="is not an export"):
        export_model(run)


def test_an_export_model_config_is_checked_like_any_config(tmp_path):
    (tmp_path / "model.yaml").write_text("num_layer: 2\n")
    with pytest.raises(UserError, match="unknown config key model.num_layer; did you mean "
                                        "model.num_layers"):
        export_model(tmp_path)
    (tmp_path / "model.yaml").write_text("num_layers: 0\n")
    with pytest.raises(UserError, match="model.num_layers=0 must be positive"):
        export_model(tmp_path)
