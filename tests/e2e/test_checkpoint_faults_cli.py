"""Checkpoint faults through the real commands: readers of a run that is training (saving a
checkpoint every step) leave it alone; a full disk during a save stops the run in one line
and the rerun resumes (a failing restore: test_checkpoint_cli.py)."""

import json
import subprocess

import pytest

from conftest import TINY, assert_refused, build_on, run_cli, run_module, start_module
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import restore_params

RUN = [*TINY, "train.log_every=5", "train.eval_every=0", "data.num_workers=0",
       "train.sample_tokens=0", "train.eval_batches=1", "train.run_dir=run"]


def steps_on_disk(checkpoints) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def others_on_disk(checkpoints) -> list[str]:
    """Anything in a checkpoint directory besides finished steps and Orbax's metadata:
    temporary directories of saves, checkpoints set aside."""
    return sorted(p.name for p in checkpoints.iterdir()
                  if not p.name.isdigit() and not p.name.startswith("_"))


# A reader of a live run, in its own process: once the run has saved a checkpoint, the
# parameters of the latest one over and over (every fifth time through the evaluate
# command's function), until the stop file appears. An audit hook records every change the
# process makes under the run directory (files opened for writing, renames, removals, new
# directories).
READER = r"""
import json, os, sys
from pathlib import Path
run, stop = Path(sys.argv[1]).absolute(), Path(sys.argv[2])
changes = []
CHANGING = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree",
            "shutil.move", "os.truncate", "os.symlink", "os.link", "os.chmod", "os.utime"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & WRITE_FLAGS
        paths = [path] if writes else []
    else:
        paths = args[:2] if event in CHANGING else []
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)) and \
                os.path.abspath(os.fsdecode(p)).startswith(str(run)):
            changes.append(f"{event} {os.fsdecode(p)}")

sys.addaudithook(audit)
import time
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.errors import UserError
from pjit_llm.inference.evaluation import evaluate_run
from pjit_llm.placement import place_for_conversion
saved = lambda: any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
while not ((run / "config.yaml").exists() and (run / "checkpoints").is_dir() and saved()):
    time.sleep(0.05)
cfg = run_config(run)
layout = place_for_conversion(cfg).layout
reads, failures = [], []
while not stop.exists():
    try:
        if len(reads) % 5 == 0:
            step, _ = evaluate_run(run, batches=1)
        else:
            _, step = restore_params(cfg, layout, None)
        reads.append(step)
    except UserError as e:
        failures.append(str(e))
print(json.dumps({"reads": reads, "failures": failures, "changes": changes}))
"""


def test_readers_of_a_live_run_leave_it_alone(tmp_path):
    run, stop = tmp_path / "run", tmp_path / "stop"
    trainer = start_module("pjit_llm.train", *RUN, "train.steps=30", "checkpoint.every=1",
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    reader = start_module(None, str(run), str(stop), code=READER, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        out, err = trainer.communicate(timeout=300)
        stop.touch()
        read_out, read_err = reader.communicate(timeout=120)
    finally:
        for proc in (trainer, reader):
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
    assert trainer.returncode == 0, err
    assert reader.returncode == 0, read_err
    seen = json.loads(read_out.strip().splitlines()[-1])
    assert seen["changes"] == [] and seen["failures"] == [], seen
    # It read while the run trained: many times, and newer checkpoints as they came.
    assert len(seen["reads"]) >= 10 and len(set(seen["reads"])) >= 5, seen["reads"]
    checkpoints = run / "checkpoints"
    assert steps_on_disk(checkpoints) == [28, 29, 30] and others_on_disk(checkpoints) == []
    cfg = run_config(run)
    layout = build_on(cfg).layout
    for step in steps_on_disk(checkpoints):  # each verified against its checksums
        assert restore_params(cfg, layout, step)[1] == step


# The training command with the save of checkpoint 3 failing in its background thread as a
# write to a full disk does (the config item's JSON file).
FULL_DISK_AT_3 = """
import errno, os
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
from pjit_llm import train
save = handler.JsonCheckpointHandler._save_fn

async def failing(self, x, directory):
    if directory.parent.name.startswith("3."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await save(self, x, directory)

handler.JsonCheckpointHandler._save_fn = failing
train.cli()
"""


def test_a_full_disk_during_a_save_stops_in_one_line_and_the_rerun_resumes(tmp_path):
    """The fault injected, for where no small filesystem can be mounted (the next test fills a
    real one where it can)."""
    if _mount_small_filesystem(tmp_path / "probe", "1m"):
        subprocess.run(["umount", "-l", str(tmp_path / "probe")], capture_output=True)
        pytest.skip("a real full disk is tested here (test_a_real_full_disk_...)")
    args = [*RUN, "train.steps=5", "checkpoint.every=1"]
    result = run_module(None, *args, cwd=tmp_path, code=FULL_DISK_AT_3)
    checkpoints = (tmp_path / "run" / "checkpoints").absolute()
    assert_refused(result, f"no space left on the device writing checkpoint step 3 to "
                           f"{checkpoints}; free space there")
    assert result.stderr.strip().endswith("it resumes from step 2"), result.stderr
    assert steps_on_disk(checkpoints) == [1, 2]
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 2" in again.stdout
    assert steps_on_disk(checkpoints) == [3, 4, 5] and others_on_disk(checkpoints) == []


def _mount_small_filesystem(where, size: str) -> bool:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True)
    return mounted.returncode == 0


def test_a_real_full_disk_stops_in_one_line_and_the_rerun_resumes(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_small_filesystem(disk, "6m"):
        pytest.skip("cannot mount a small tmpfs here (needs the privilege to mount)")
    try:
        args = [*RUN, "train.steps=12", "checkpoint.every=1", "checkpoint.keep=100"]
        result = run_cli(*args, cwd=disk)
        checkpoints = disk / "run" / "checkpoints"
        saved = steps_on_disk(checkpoints)
        assert 0 < len(saved) < 12, saved
        assert_refused(result, f"no space left on the device writing checkpoint step "
                               f"{max(saved) + 1} to {checkpoints.absolute()}; free space there")
        assert result.stderr.strip().endswith(f"it resumes from step {max(saved)}")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = run_cli(*args, cwd=disk)
        assert again.returncode == 0, again.stderr
        assert f"resumed from step {max(saved)}" in again.stdout
        assert steps_on_disk(checkpoints) == list(range(1, 13))
        assert others_on_disk(checkpoints) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
