"""Checkpoints through the real command, with real Orbax on disk and real signals: exact
resume (Grain worker processes on), retention, refusals on resume, a moved run resumed
through its config.yaml, SIGTERM, SIGKILL mid-save, damaged or bit-rotten latest checkpoints
falling back to the previous one, and a restore that fails for another reason (device
memory) stopping in one line with nothing moved.

Most tests start from a copy of one run trained once per module (`base_run`), so each needs
a single further process."""

import json
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from conftest import TINY, assert_refused, run_cli, run_module, start_module

# No samples at evaluations: nothing here reads them, and they cost a compile per run.
RUN = [*TINY, "train.log_every=1", "train.eval_every=0", "data.num_workers=2",
       "train.sample_tokens=0", "train.eval_batches=1"]
# The base run: 10 steps, saved every 2, keeping the newest 2 and every 4th: [4, 8, 10].
BASE = [*RUN, "train.steps=10", "checkpoint.every=2", "checkpoint.keep=2",
        "checkpoint.keep_every=4"]


def losses(run_dir) -> dict[int, list[float]]:
    """Every logged training loss by step (a resumed run logs some steps twice)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def steps_on_disk(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def cli(tmp_path, *args):
    return run_cli(*RUN, "train.run_dir=run", *args, cwd=tmp_path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("base")
    result = run_cli(*BASE, "train.run_dir=run", cwd=where)
    assert result.returncode == 0, result.stderr
    return where / "run"


@pytest.fixture
def copied_run(base_run, tmp_path):
    """A copy of the base run as `run` in this test's directory, free to change."""
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def test_retention_keeps_the_newest_and_every_mth(base_run):
    assert steps_on_disk(base_run) == [4, 8, 10]


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, copied_run):
    # Lose everything after step 8, as a crash would, and run the same command again.
    shutil.rmtree(copied_run / "checkpoints" / "10")
    result = run_cli(*BASE, "train.run_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from step 8" in result.stdout
    logged = losses(copied_run)
    for step in (9, 10):  # same parameters, same batches: the same losses, bit for bit
        first, again = logged[step]
        assert first == again, (step, first, again)
    assert all(len(logged[s]) == 1 for s in range(1, 9))


def test_refusals_on_resume(tmp_path, copied_run):
    changed = cli(tmp_path, "train.steps=12", "model.num_layers=3")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "step 10: model.num_layers was 2 and is now 3; set it back or use a new train.run_dir" \
        in changed.stderr
    fresh = cli(tmp_path, "train.steps=12", "train.resume=false")
    assert fresh.returncode == 2 and "already holds checkpoints (latest step 10)" in fresh.stderr


def test_a_moved_run_resumes_through_its_config_where_it_now_is(tmp_path):
    """The run records absolute locations of itself (run_dir, checkpoint.directory); after
    `mv A B`, `--config B/config.yaml` continues in B from B's checkpoint."""
    a, b = tmp_path / "A", tmp_path / "B"
    args = [*RUN, "data.num_workers=0", "checkpoint.every=2"]
    first = run_cli(*args, "train.steps=4", f"train.run_dir={a}",
                    f"checkpoint.directory={a / 'ckpts'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    a.rename(b)
    again = run_cli("--config", str(b / "config.yaml"), "train.steps=6", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed from step 4 of {b / 'ckpts'}" in again.stdout
    assert not a.exists()  # nothing created at the old place
    assert sorted(int(p.name) for p in (b / "ckpts").iterdir()) == [2, 4, 6]
    assert {step: len(seen) for step, seen in losses(b).items()} == {s: 1 for s in range(1, 7)}
    recorded = yaml.safe_load((b / "config.yaml").read_text())
    assert (recorded["train"]["run_dir"], recorded["checkpoint"]["directory"]) == (
        str(b), str(b / "ckpts"))


def test_sigterm_saves_and_a_restart_continues(tmp_path):
    proc = start_module("pjit_llm.train", *RUN, "train.steps=100000", "checkpoint.every=0",
                        "train.run_dir=run", cwd=tmp_path, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("loss") >= 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "Traceback" not in err
    saved = steps_on_disk(tmp_path / "run")
    assert len(saved) == 1 and f"stopped by SIGTERM after step {saved[0]}" in out
    again = cli(tmp_path, f"train.steps={saved[0] + 2}", "checkpoint.every=0")
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {saved[0]}" in again.stdout
    assert max(losses(tmp_path / "run")) == saved[0] + 2


def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path):
    args = [*RUN, "train.steps=100000", "checkpoint.every=1", "data.num_workers=0",
            "train.run_dir=run"]
    proc = start_module("pjit_llm.train", *args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "checkpoints").exists() and len(steps_on_disk(run)) >= 3):
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs, a save is almost certainly in flight
        proc.wait(timeout=60)
    latest = max(steps_on_disk(run))
    again = cli(tmp_path, f"train.steps={latest + 1}", "checkpoint.every=1", "data.num_workers=0")
    assert again.returncode == 0, again.stderr
    resumed = int(again.stdout.split("resumed from step ")[1].split()[0])
    assert resumed >= latest - 1  # the newest finished save (the newest may have been cut)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, copied_run):
    for f in (copied_run / "checkpoints" / "10" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate the data files
    again = run_cli(*BASE, "train.run_dir=run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "checkpoint step 10" in warnings[0]
    assert "resumed from step 8" in again.stdout
    assert any(p.name.startswith("10.unreadable-") for p in (copied_run / "checkpoints").iterdir())
    assert steps_on_disk(copied_run) == [4, 8, 10]  # step 10 written again from the good state


def flip_bytes_in_largest_data_file(step_dir, count=64):
    """Bit rot after a clean save: invert `count` bytes in the middle of the largest OCDBT
    data file (the `d/` folders) of a checkpoint's state, leaving its size unchanged."""
    data = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    largest = max(data, key=lambda f: f.stat().st_size)
    raw = bytearray(largest.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
    largest.write_bytes(bytes(raw))


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous(tmp_path, copied_run):
    uninterrupted = losses(copied_run)
    flip_bytes_in_largest_data_file(copied_run / "checkpoints" / "10")
    again = run_cli(*BASE, "train.run_dir=run", cwd=tmp_path)  # the same command, restarted
    assert again.returncode == 0, again.stderr
    # Flipped bytes inside stored values read back silently and only the checksums catch them
    # (the usual case); where they hit a compressed block's header, reading fails instead.
    # Either way the checkpoint is moved aside with one warning and the run resumes.
    warnings = [line for line in again.stderr.splitlines() if "checkpoint step 10" in line]
    assert len(warnings) == 1, again.stderr
    kind = "damaged" if "damaged" in warnings[0] else "unreadable"
    if kind == "damaged":
        assert "differs from its checksum at save" in warnings[0]
    else:
        assert "is unreadable" in warnings[0], warnings[0]
    assert "resumed from step 8" in again.stdout
    assert any(p.name.startswith(f"10.{kind}-") for p in (copied_run / "checkpoints").iterdir())
    assert steps_on_disk(copied_run) == [4, 8, 10]  # step 10 written again from the good state
    logged = losses(copied_run)
    for step in (9, 10):  # retrained from step 8: the uninterrupted run's losses, bit for bit
        assert logged[step] == uninterrupted[step] * 2, (step, logged[step])


# The training command with the restore of the training state failing as it does when the
# devices run out of memory; the files are untouched.
OUT_OF_MEMORY = """
import jax
import orbax.checkpoint as ocp
from pjit_llm import train
restore = ocp.CheckpointManager.restore

def failing(self, step, *args, **kwargs):
    if "state" in kwargs.get("args", {}):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB.")
    return restore(self, step, *args, **kwargs)

ocp.CheckpointManager.restore = failing
train.cli()
"""


def test_a_restore_out_of_memory_stops_in_one_line_and_moves_nothing(tmp_path, copied_run):
    result = run_module(None, *BASE, "train.steps=12", "train.run_dir=run", cwd=tmp_path,
                        code=OUT_OF_MEMORY)
    assert_refused(result, f"cannot restore checkpoint step 10 in {copied_run / 'checkpoints'} "
                           "(JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying")
    assert "every checkpoint is left in place" in result.stderr
    assert sorted(p.name for p in (copied_run / "checkpoints").iterdir()
                  if not p.name.startswith("_")) == ["10", "4", "8"]
