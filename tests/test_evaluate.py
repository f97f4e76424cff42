"""The standalone evaluation reports what the evaluation during training reported."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def test_evaluate_cli_matches_the_in_training_evaluation_on_another_mesh(tmp_path):
    trained = run_cli("--emulate-devices", "8", *TINY, "mesh.data=2", "mesh.fsdp=2",
                      "mesh.tensor=2", "train.steps=4", "train.eval_every=2", "train.eval_batches=2",
                      "data.num_workers=0", "train.run_dir=run", f"data.data_dir={tmp_path}",
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    at = {r["step"]: r for r in records if "eval_loss" in r}
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    result = subprocess.run(
        [sys.executable, "-m", "pjit_llm.evaluate", "--run", "run", "--emulate-devices", "4",
         "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "mesh data=1 x fsdp=4 x tensor=1 over 4 cpu device(s)" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 4
    assert report["eval_loss"] == pytest.approx(at[4]["eval_loss"], rel=1e-5)
    assert report["eval_bits_per_byte"] == pytest.approx(report["eval_loss"] / math.log(2))
    assert at[4]["eval_bits_per_byte"] == pytest.approx(at[4]["eval_loss"] / math.log(2))
    earlier = subprocess.run([sys.executable, "-m", "pjit_llm.evaluate", "--run", "run",
                              "--step", "2"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert earlier.returncode == 2 and "no checkpoint for step 2" in earlier.stderr
    missing = subprocess.run([sys.executable, "-m", "pjit_llm.evaluate", "--run", "nowhere"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "is not a run directory" in missing.stderr


def test_tensorboard_events_hold_the_training_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = run_cli(*TINY, "train.steps=4", "train.log_every=2", "train.eval_every=2",
                     "train.eval_batches=1", "data.num_workers=0", "train.peak_tflops=0.5",
                     "train.run_dir=run", f"data.data_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/step_s",
                "train/tflops_per_device", "train/mfu", "eval/eval_loss", "eval/eval_ppl",
                "eval/eval_bits_per_byte"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [0, 2, 4]
    mfu, tflops = events.Scalars("train/mfu")[-1].value, events.Scalars("train/tflops_per_device")[-1].value
    assert mfu == pytest.approx(tflops / 0.5, rel=1e-4)
    assert "GFLOP per step" in result.stdout and "per device" in result.stdout
    # Greedy samples from the fixed prompts at each evaluation, as text.
    assert "sample 0 at step 4: 'def " in result.stdout
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(events.Tags()["tensors"])


def test_profile_steps_write_a_trace(tmp_path):
    result = run_cli(*TINY, "train.steps=4", "train.profile_steps=[2,3]", "train.eval_every=0",
                     "data.num_workers=0", "train.run_dir=run", f"data.data_dir={tmp_path}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote a profile of steps 2-3" in result.stdout
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
