"""The evaluation command on the session's trained run, on another mesh, reports what the
evaluation during training reported."""

import json
import math

import pytest

from conftest import run_module
from pjit_llm.errors import UserError


def test_evaluate_cli_matches_the_in_training_evaluation_on_another_mesh(trained_run):
    run = trained_run.directory
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    at = {r["step"]: r for r in records if "eval_loss" in r}
    result = run_module("pjit_llm.evaluate", "--run", str(run), "--emulate-devices", "4",
                        "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1")
    assert result.returncode == 0, result.stderr
    assert "mesh data=1 x stage=1 x fsdp=4 x context=1 x tensor=1 x expert=1 over 4 cpu device(s)" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 6
    assert report["eval_loss"] == pytest.approx(at[6]["eval_loss"], rel=1e-5)
    assert report["eval_bits_per_byte"] == pytest.approx(report["eval_loss"] / math.log(2))
    assert at[6]["eval_bits_per_byte"] == pytest.approx(at[6]["eval_loss"] / math.log(2))


def test_a_step_without_a_checkpoint_is_refused(trained_run):
    from pjit_llm.evaluate import main
    with pytest.raises(UserError, match="no checkpoint for step 2"):
        main(["--run", str(trained_run.directory), "--step", "2"])  # in this process


def test_evaluate_cli_quantizes_to_int8_at_load_time(trained_run):
    run = trained_run.directory
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained_loss = next(r["eval_loss"] for r in records if "eval_loss" in r and r["step"] == 6)
    result = run_module("pjit_llm.evaluate", "--run", str(run), "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["eval_loss"] == pytest.approx(trained_loss, rel=0.005)
    assert report["eval_loss"] != pytest.approx(trained_loss, rel=1e-6)  # int8 is what ran
