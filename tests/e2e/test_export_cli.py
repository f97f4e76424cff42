"""The export command on (a copy of) the session's trained run: parameters alone, in
bfloat16, that restore onto another mesh without the optimizer state."""

import shutil

import jax
import pytest
from flax import nnx

from conftest import build_on, run_module, tiny_config
from pjit_llm.checkpoint.exports import load_params
from pjit_llm.errors import UserError


def test_export_writes_parameters_only_and_restores_without_the_optimizer(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.directory, run)  # the export goes into the run directory
    result = run_module("pjit_llm.export", "--run", "run", "--dtype", "bfloat16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = run / "export" / "step_6-bfloat16"
    assert f"wrote parameters of step 6 in bfloat16 to {out}" in result.stdout
    layout = build_on(tiny_config(), fsdp=4, tensor=2).layout
    model, params = load_params(out, layout)
    assert model.num_layers == 2 and model.param_dtype == "bfloat16"
    wq = params["blocks"]["attn"]["wq"]
    wq = wq[...] if isinstance(wq, nnx.Variable) else wq
    assert wq.dtype == jax.numpy.bfloat16 and wq.sharding.spec[1] == "fsdp"
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    ckpt = sum(f.stat().st_size for f in (run / "checkpoints/6/state").rglob("*") if f.is_file())
    assert size < ckpt / 4  # no optimizer state, half the bytes per parameter
    from pjit_llm.export import main
    with pytest.raises(UserError, match="already exists"):  # in this process
        main(["--run", str(run)])
