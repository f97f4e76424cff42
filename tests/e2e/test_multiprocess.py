"""Multi-process runs on 127.0.0.1: real jax.distributed processes with CPU collectives."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY, assert_refused, run_module, start_module
from pjit_llm.launch import free_port, launch
from pjit_llm.parallel.distributed import LOST_PROCESS_EXIT

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.shards=2"]
RUN = [*TINY, *MESH, "train.log_every=1", "train.eval_every=0", "data.num_workers=0",
       "train.sample_tokens=0", "train.eval_batches=1", "distributed.heartbeat_timeout_s=10"]


def _env(pid: int, port: int, n: int = 2) -> dict:
    return dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES=str(n),
                PROCESS_ID=str(pid))


def _losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())
            if "loss" in r}


def test_two_processes_through_the_launcher_match_one_process_and_stop_together(
        tmp_path, monkeypatch):
    """The launcher starts both processes; their first five losses are those of one process
    of 8 devices; SIGTERM to the launcher reaches both, which save and stop after the same
    step. (optimizer.decay_steps: the same schedule in a run of 5 steps and an open one.)"""
    args = [*RUN, "optimizer.decay_steps=5", "checkpoint.every=0"]
    launcher = start_module("pjit_llm.launch", "--processes", "2", "--emulate-devices", "4",
                            "--", *args, "train.steps=100000", "mesh.dcn_data=2",
                            "train.run_dir=multi", cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "multi" / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("loss") >= 5):
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)  # passed on to both processes
        out, err = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate(timeout=60)
    assert launcher.returncode == 0, err[-3000:]
    assert "process 0 of 2 (from environment" in out
    assert "mesh data=2 x stage=1 x fsdp=2 x context=1 x tensor=2 x expert=1 over 8 cpu device(s)" in out
    saved = [p for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1, saved
    assert f"after step {saved[0].name}; checkpoint saved" in out
    # Both processes wrote their part of the checkpoint, and its data position.
    assert sorted(p.name for p in (saved[0] / "data").glob("*.json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    # The same run in one process of 8 devices: this one.
    from pjit_llm.train import main as train
    monkeypatch.chdir(tmp_path)
    train(["--emulate-devices", "8", *args, "train.steps=5", "train.run_dir=single"])
    multi, one = _losses(metrics), _losses(tmp_path / "single/metrics.jsonl")
    assert sorted(multi) == list(range(1, int(saved[0].name) + 1)) and len(multi) >= 5
    for step in range(1, 6):
        assert multi[step] == pytest.approx(one[step], rel=1e-5), step


def _child_with_process_id(parent: int, process_id: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"PROCESS_ID={process_id}".encode() in environ:
            return pid
    raise AssertionError(f"no child with PROCESS_ID={process_id} among {children}")


def test_a_killed_process_is_named_by_the_other_and_a_restart_resumes(tmp_path):
    """Under the launcher, SIGKILL to process 1: process 0 names it and exits 3 (before JAX's
    own heartbeat could abort it), the launcher reports the first failure and exits with its
    status; restarted, both resume from the newest complete checkpoint."""
    args = ["--emulate-devices", "4", *RUN, "train.steps=100000", "checkpoint.every=5",
            "train.run_dir=run"]
    launcher = start_module("pjit_llm.launch", "--processes", "2", args[0], args[1], "--",
                            *args[2:], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ckpts = tmp_path / "run" / "checkpoints"
        deadline = time.time() + 180
        while time.time() < deadline and not (ckpts.exists() and
                                               any(p.name == "10" for p in ckpts.iterdir())):
            time.sleep(0.2)
        assert (ckpts / "10").exists()
        os.kill(_child_with_process_id(launcher.pid, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]  # the first failure's
    assert waited < 10 + 8  # the heartbeat timeout, plus a beat interval and exit
    assert "launch: process 1 was killed by SIGKILL (status 137)" in err
    assert "error: lost process 1 of 2 (no heartbeat for" in err
    assert f"launch: process 0 exited with status {LOST_PROCESS_EXIT}" in err
    assert "Terminating process" not in err and "Check failure" not in err  # not JAX's abort
    # Restart both by hand: they resume from the newest complete checkpoint.
    port = free_port()
    args[args.index("train.steps=100000")] = "train.steps=12"
    procs = [start_module("pjit_llm.train", *args, cwd=tmp_path, env=_env(i, port),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert "resumed from step " in outs[0][0]


def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    start = time.monotonic()
    result = run_module("pjit_llm.train", *TINY, "distributed.init_timeout_s=5", cwd=tmp_path,
                        env=_env(1, free_port()), timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 2, result.stderr
    assert "could not reach the coordinator 127.0.0.1:" in result.stderr
    assert "(process 0) from process 1 within 5s" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_launcher_sees_a_failed_second_process_while_the_first_runs(tmp_path, monkeypatch,
                                                                       capfd):
    (tmp_path / "by_process.py").write_text(
        "import os, sys, time\n"
        "if os.environ['PROCESS_ID'] == '1':\n"
        "    sys.exit(5)\n"
        "time.sleep(20)\n")
    monkeypatch.chdir(tmp_path)  # `python -m by_process` finds it in the working directory
    start = time.monotonic()
    status = launch(2, [], grace=2, module="by_process")
    assert status == 5
    assert time.monotonic() - start < 10  # the grace, not process 0's 20 s
    err = capfd.readouterr().err
    assert "launch: process 1 exited with status 5" in err
    assert "launch: killing process 0, still running 2s after the first failure" in err


def test_processes_started_with_different_configs_are_refused(tmp_path):
    port = free_port()
    args = [*RUN, "train.steps=5", "train.run_dir=run"]
    lrs = ["optimizer.lr=1e-3", "optimizer.lr=3e-3"]
    start = time.monotonic()
    procs = [start_module("pjit_llm.train", "--emulate-devices", "4", *args, lrs[i], cwd=tmp_path,
                          env=_env(i, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
             for i in range(2)]
    try:
        results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=120))
                   for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    assert time.monotonic() - start < 60
    line = ("process 1's config differs from process 0's at optimizer.lr: 0.003 against 0.001; "
            "start every process with the same config")
    for proc, result in zip(procs, results):
        result.returncode = proc.returncode
        assert_refused(result, line)
    assert not (tmp_path / "run").exists()  # refused before anything was built or written
