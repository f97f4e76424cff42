"""The export command on (a copy of) the session's trained run: parameters alone, in
bfloat16, that restore onto another mesh without the optimizer state; an int8 export that
evaluate and generate read as a run."""

import json
import shutil

import jax
import pytest
from flax import nnx

from conftest import assert_refused, build_on, run_module, tiny_config
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import inference_params
from pjit_llm.errors import UserError


def test_export_writes_parameters_only_and_restores_without_the_optimizer(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.directory, run)  # the export goes into the run directory
    result = run_module("pjit_llm.export", "--run", "run", "--dtype", "bfloat16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = run / "export" / "step_6-bfloat16"
    assert f"wrote parameters of step 6 in bfloat16 to {out}" in result.stdout
    layout = build_on(tiny_config(), fsdp=4, tensor=2).layout
    params, _, model = inference_params(run_config(out), layout, None)
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


def test_an_int8_export_evaluates_and_generates_like_the_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.directory, run)
    result = run_module("pjit_llm.export", "--run", "run", "--quantize", "int8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = run / "export" / "step_6-int8"
    assert f"wrote parameters of step 6 in int8 (the rest in bfloat16) to {out}" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained_loss = next(r["eval_loss"] for r in records if "eval_loss" in r and r["step"] == 6)
    evaluated = run_module("pjit_llm.evaluate", "--run", str(out), "--emulate-devices", "4",
                           "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["step"] == 6
    assert report["eval_loss"] == pytest.approx(trained_loss, rel=0.005)  # int8 costs < 0.5%
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.yaml", "params", "step"]
    generated = run_module("pjit_llm.generate", "--run", str(out), "--prompt", "import os",
                           "--max-new-tokens", "5")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("import os") and len(generated.stdout) > len("import os\n")
    refused = run_module("pjit_llm.generate", "--run", str(out), "--prompt", "a",
                         "--quantize", "int4")
    assert_refused(refused, "--quantize int4 is not supported; use none or int8")
