"""A pipelined run through the real commands: training on 4 circular stages logs its
schedule and samples, and its checkpoint evaluates on a mesh without stages to the loss the
run reported. (Restoring and resuming across meshes, both ways: test_stages.py.)"""

import json

import pytest

from conftest import TINY, run_cli, run_module

STAGED = ["--emulate-devices", "8", *TINY, "model.num_layers=8", "mesh.stage=4", "mesh.data=2",
          "train.microbatches=4", "train.pipeline_repeats=2", "train.steps=4", "train.eval_every=0",
          "train.eval_batches=2", "train.log_every=2", "train.sample_tokens=8",
          "data.num_workers=0", "checkpoint.every=2"]


def test_a_staged_run_continues_on_meshes_without_stages(tmp_path):
    result = run_cli(*STAGED, "train.run_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mesh data=2 x stage=4 x fsdp=1 x context=1 x tensor=1 x expert=1" in result.stdout
    assert "pipeline circular x2: 4 stages, 4 micro-batches, 11 iterations, bubble 27.3%" \
        in result.stdout
    assert "sample 0 at step 4: 'def " in result.stdout  # the generator takes model order
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}

    evaluated = run_module("pjit_llm.evaluate", "--run", str(run), "--emulate-devices", "8",
                           "mesh.stage=1", "mesh.data=1", "mesh.fsdp=8")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["eval_loss"] == pytest.approx(trained[4], rel=1e-5)
