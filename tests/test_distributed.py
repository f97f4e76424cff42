"""Multi-process runs on 127.0.0.1: real jax.distributed processes with CPU collectives."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY
from pjit_llm.config import DistributedConfig, MeshConfig
from pjit_llm.parallel.distributed import LOST_PROCESS_EXIT, detect, first_host
from pjit_llm.errors import UserError
from pjit_llm.launch import free_port

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.shards=2"]
RUN = [*TINY, *MESH, "train.log_every=1", "train.eval_every=0", "data.num_workers=0",
       "distributed.heartbeat_timeout_s=10"]


def test_detect_explicit_settings_first():
    cfg = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                            local_device_ids=(2,))
    topo = detect(cfg, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"})
    assert (topo.source, topo.coordinator, topo.num_processes, topo.process_id,
            topo.local_device_ids) == ("config", "10.0.0.1:1234", 4, 2, (2,))
    with pytest.raises(UserError, match="must be set together"):
        detect(DistributedConfig(coordinator_address="h:1"), {})


def test_detect_slurm():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NODELIST": "gpu[007-008,012],cpu1"}
    topo = detect(DistributedConfig(), env)
    assert (topo.source, topo.coordinator, topo.num_processes, topo.process_id,
            topo.local_device_ids) == ("SLURM", "gpu007:12345", 16, 9, (1,))
    one_per_node = dict(env, SLURM_NTASKS_PER_NODE="1", PJIT_LLM_COORDINATOR_PORT="2222",
                        SLURM_STEP_NODELIST="a100-node3")
    topo = detect(DistributedConfig(), one_per_node)
    assert topo.coordinator == "a100-node3:2222" and topo.local_device_ids is None
    assert first_host("node[1-4]") == "node1" and first_host("x,y") == "x"


def test_detect_kubernetes_and_generic_variables():
    k8s = {"JOB_COMPLETION_INDEX": "3", "JAX_COORDINATOR_ADDRESS": "run-0.run:1234",
           "NUM_PROCESSES": "4"}
    topo = detect(DistributedConfig(), k8s)
    assert (topo.source, topo.coordinator, topo.num_processes, topo.process_id) == \
        ("Kubernetes", "run-0.run:1234", 4, 3)
    generic = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:9", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}
    topo = detect(DistributedConfig(), generic)
    assert (topo.source, topo.num_processes, topo.process_id) == ("environment", 2, 1)
    assert detect(DistributedConfig(), {}) is None
    with pytest.raises(UserError, match="must be set together"):
        detect(DistributedConfig(), {"NUM_PROCESSES": "2"})


def test_hybrid_mesh_checks():
    from pjit_llm.parallel.mesh import make_mesh
    with pytest.raises(UserError, match="needs 2 processes but 1 are available"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, dcn_data=2))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, dcn_data=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def _env(pid: int, port: int, n: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES=str(n),
                PROCESS_ID=str(pid))


def _losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())
            if "loss" in r}


pytestmark = pytest.mark.slow


def test_two_processes_through_the_launcher_match_one_process(tmp_path):
    args = [*RUN, "train.steps=5", f"data.data_dir={tmp_path / 'data'}"]
    launched = subprocess.run(
        [sys.executable, "-m", "pjit_llm.launch", "--processes", "2", "--emulate-devices", "4",
         "--", *args, "mesh.dcn_data=2", "train.run_dir=multi"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "process 0 of 2 (from environment" in launched.stdout
    assert "mesh data=2 x fsdp=2 x tensor=2 over 8 cpu device(s)" in launched.stdout
    single = subprocess.run(
        [sys.executable, "-m", "pjit_llm.train", "--emulate-devices", "8", *args,
         "train.run_dir=single"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")})
    assert single.returncode == 0, single.stderr
    multi, one = _losses(tmp_path / "multi/metrics.jsonl"), _losses(tmp_path / "single/metrics.jsonl")
    assert sorted(multi) == [1, 2, 3, 4, 5]
    for step in multi:
        assert multi[step] == pytest.approx(one[step], rel=1e-5), step
    # Both processes wrote their part of the checkpoint, and its data position.
    data = tmp_path / "multi/checkpoints/5/data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_a_killed_process_stops_the_other_and_a_restart_resumes(tmp_path):
    port = free_port()
    args = [sys.executable, "-m", "pjit_llm.train", "--emulate-devices", "4", *RUN,
            "train.steps=100000", "checkpoint.every=5", "train.run_dir=run",
            f"data.data_dir={tmp_path / 'data'}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=_env(i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        ckpts = tmp_path / "run" / "checkpoints"
        deadline = time.time() + 180
        while time.time() < deadline and not (ckpts.exists() and
                                               any(p.name == "10" for p in ckpts.iterdir())):
            time.sleep(0.2)
        assert (ckpts / "10").exists()
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == LOST_PROCESS_EXIT
    assert waited < 10 + 8  # the heartbeat timeout, plus a beat interval and exit
    assert "error: lost process 1 of 2 (no heartbeat for" in err
    # Restart both: they resume from the newest complete checkpoint.
    port = free_port()
    args[args.index("train.steps=100000")] = "train.steps=12"
    procs = [subprocess.Popen(args, cwd=tmp_path, env=_env(i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert "resumed from step " in outs[0][0]


def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pjit_llm.train", *TINY, "distributed.init_timeout_s=5"],
        cwd=tmp_path, env=_env(1, free_port()), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 2, result.stderr
    assert "could not reach the coordinator 127.0.0.1:" in result.stderr
    assert "(process 0) from process 1 within 5s" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_every_process_after_the_same_step(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pjit_llm.launch", "--processes", "2", "--emulate-devices", "4",
         "--", *RUN, "train.steps=100000", "checkpoint.every=0", "train.run_dir=run",
         f"data.data_dir={tmp_path / 'data'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")})
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("loss") >= 3):
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)  # passed on to both processes
        out, err = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, err[-3000:]
    saved = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1, saved
    assert f"after step {saved[0].name}; checkpoint saved" in out
    assert sorted(p.name for p in (saved[0] / "data").glob("*.json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
