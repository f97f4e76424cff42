"""The training command in real processes: one refusal of each kind exits 2 with one line
(the rest are checked in this process by test_train.py), a local JSONL run names the file
and line of its bad records, and the session's short run on a hybrid mesh writes its run directory: config,
metrics, TensorBoard scalars and samples, a profile."""

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import TINY, assert_refused, run_cli


@pytest.mark.parametrize("args, message", [
    (["model.num_layer=3"], "unknown config key model.num_layer; did you mean model.num_layers?"),
    (["--emulate-devices", "8", "mesh.data=3"],
     "mesh (data=3, stage=1, fsdp=1, context=1, tensor=1, expert=1) needs 3 devices but 8"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, args, message):
    result = run_cli(*args, f"train.run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'data'}",
                     cwd=tmp_path)
    assert_refused(result, message)
    assert not (tmp_path / "run").exists()  # nothing written


def test_data_errors_exit_2_with_one_line(tmp_path):
    (tmp_path / "c.jsonl").write_text("not json\n")
    result = run_cli("data.source=local", "data.paths=[c.jsonl]", "train.run_dir=run",
                     "data.data_dir=data", cwd=tmp_path)
    assert_refused(result, "the corpus gives no train records (1 files; skipped 1 bad record in "
                   "c.jsonl: line 1 is not JSON (Expecting value at column 1))")
    assert not (tmp_path / "run").exists()
    # Nothing half-written: no dataset left in TFDS's temporary preparation directories.
    assert not [p for p in tmp_path.rglob("*") if "incomplete" in p.name]


def test_local_jsonl_run_skips_bad_records_and_says_where(tmp_path):
    lines = [json.dumps({"text": f"record {i}: " + "the quick brown fox " * 8}) for i in range(60)]
    lines[5] = "{broken"
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(*TINY, "train.steps=4", "train.log_every=2", "data.source=local",
                     "data.paths=[c.jsonl]", "data.num_workers=2", "train.run_dir=run",
                     "data.data_dir=data", "train.sample_tokens=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("warning: skipped 1 bad record in c.jsonl: line 6 is not JSON (Expecting property "
            "name enclosed in double quotes at column 2)\n") in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_short_run_on_a_hybrid_mesh_writes_its_run_directory(trained_run):
    run, result = trained_run.directory, trained_run.result
    assert "mesh data=2 x stage=1 x fsdp=2 x context=1 x tensor=2 x expert=1 over 8 cpu device(s)" in result.stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["mesh"]["data"] == 2 and config["model"]["vocab_size"] == 384
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in train)
    assert evals[0]["eval_loss"] > 0.8 * math.log(384)  # a fresh model knows next to nothing
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_bits_per_byte"] == pytest.approx(evals[-1]["eval_loss"] / math.log(2))


def test_tensorboard_events_hold_the_training_scalars(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = trained_run.result  # trained with train.peak_tflops=0.5
    events = EventAccumulator(str(trained_run.directory / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/step_s",
                "train/tflops_per_device", "train/mfu", "eval/eval_loss", "eval/eval_ppl",
                "eval/eval_bits_per_byte"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [0, 3, 6]
    mfu, tflops = events.Scalars("train/mfu")[-1].value, events.Scalars("train/tflops_per_device")[-1].value
    assert mfu == pytest.approx(tflops / 0.5, rel=1e-4)
    assert "GFLOP per step" in result.stdout and "per device" in result.stdout
    # Greedy samples from the fixed prompts at each evaluation, as text.
    assert "sample 0 at step 6: 'def " in result.stdout
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(events.Tags()["tensors"])


def test_profile_steps_write_a_trace(trained_run):
    assert "wrote a profile of steps 2-3" in trained_run.result.stdout
    traces = list((trained_run.directory / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_the_tiny_moe_config_logs_its_router_to_tensorboard(tmp_path):
    """configs/tiny-moe.yaml as shipped (8 emulated devices, the experts split four ways),
    shortened: each logged step carries the router's metrics, in metrics.jsonl and as
    TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config = Path(__file__).parents[2] / "configs" / "tiny-moe.yaml"
    result = run_cli("--config", str(config), "train.steps=4", "optimizer.warmup_steps=1",
                     "train.log_every=2", "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0",
                     "checkpoint.every=0", "data.seq_len=32", "train.run_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "expert=4" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all(r["moe_aux_loss"] > 1 and r["expert_dropped_share"] == 0 for r in train)
    assert all(16 * 32 * 2 / 8 <= r["expert_tokens_max"] for r in train)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for name in ("moe_aux_loss", "router_z_loss", "expert_tokens_max", "expert_tokens_mean",
                 "expert_dropped_share"):
        assert [e.step for e in events.Scalars(f"train/{name}")] == [2, 4], name
