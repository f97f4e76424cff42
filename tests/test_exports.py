"""Exports: a checkpoint's parameters alone, in one dtype or with int8 weight matrices, with
the model config beside them, read back into the shardings of another mesh."""

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.checkpoint.exports import write_export
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import inference_params
from pjit_llm.config import CheckpointConfig
from pjit_llm.errors import UserError
from pjit_llm.models.quantize import Int8Weight, param_bytes, quantize


def _saved_run(tmp_path):
    """(run directory, its components, the state) of a fresh model checkpointed at step 5 on
    a (2, 2, 2) mesh."""
    run = tmp_path / "run"
    parts = build_on(tiny_config(f"train.run_dir={run}"), data=2, fsdp=2, tensor=2)
    state = parts.init_state()
    ckpts = Checkpoints(run / "checkpoints", CheckpointConfig())
    ckpts.save(5, state, {}, parts.cfg)
    ckpts.close()
    return run, parts, state


def test_export_reads_back_on_another_mesh_in_its_dtype(tmp_path):
    run, parts, state = _saved_run(tmp_path)
    out, step = write_export(parts.cfg, parts.layout, None, None, "bfloat16")
    assert (out, step) == (run / "export" / "step_5-bfloat16", 5)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left beside it
    layout = build_on(tiny_config(), fsdp=4, tensor=2).layout
    params, _, model = read_export(out, layout)
    assert model == parts.cfg.model.__class__(**{**parts.cfg.model.__dict__, "param_dtype": "bfloat16"})
    expected = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16),
                            jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
    assert params["blocks"]["attn"]["wq"].sharding.spec[1] == "fsdp"
    with pytest.raises(UserError, match="already exists; remove it or pass another --out"):
        write_export(parts.cfg, parts.layout, out, None, "float32")


def test_an_int8_export_holds_int8_weights_that_read_back_on_another_mesh(tmp_path):
    run, parts, state = _saved_run(tmp_path)
    bf16, _ = write_export(parts.cfg, parts.layout, None, None, "bfloat16")
    out, step = write_export(parts.cfg, parts.layout, None, None, "bfloat16", "int8")
    assert (out, step) == (run / "export" / "step_5-int8", 5)
    layout = build_on(tiny_config(), fsdp=4, tensor=2).layout
    params, _, model = read_export(out, layout)
    assert (model.quantize, model.param_dtype) == ("int8", "bfloat16")
    assert run_config(out).model == model  # the whole config beside it says so too
    wq = params["blocks"]["attn"]["wq"][...]
    assert isinstance(wq, Int8Weight)
    assert wq.values.sharding.spec == layout.spec(("layers", "embed", "heads", "head_dim"))
    expected = quantize(state.params["blocks"]["attn"]["wq"][...], (1,))  # contracts embed
    np.testing.assert_array_equal(np.asarray(wq.values), np.asarray(expected.values))
    np.testing.assert_array_equal(np.asarray(wq.scale), np.asarray(expected.scale))
    assert params["final_norm"]["scale"][...].dtype == jax.numpy.bfloat16
    ratio = param_bytes(params) / param_bytes(read_export(bf16, layout)[0])
    assert 0.5 < ratio < 0.55, ratio  # int8 values, float32 scales, bfloat16 norms
    with pytest.raises(UserError, match="--quantize int4 is not supported; use none or int8"):
        write_export(parts.cfg, parts.layout, tmp_path / "x", None, "bfloat16", "int4")


def read_export(out, layout):
    """(params, step, model config) of an export, read as evaluate and generate read it."""
    return inference_params(run_config(out), layout, None)
