"""Detecting the multi-process topology from settings, SLURM, Kubernetes or plain variables.
(Real multi-process runs: e2e/test_multiprocess.py.)"""

from pathlib import Path

import pytest

from conftest import tiny_config
from pjit_llm.config import DistributedConfig, load_config
from pjit_llm.errors import UserError
from pjit_llm.parallel.agreement import first_difference
from pjit_llm.parallel.distributed import (Watchdog, detect, describe, first_host,
                                           runtime_timeouts)
from pjit_llm.startup import shared_settings

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


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


def test_a_single_process_describes_its_devices():
    assert describe(None) == "single process: 8 local of 8 cpu devices"


@pytest.mark.parametrize("config", [None, *CONFIGS], ids=lambda c: c.name if c else "defaults")
def test_the_watchdog_always_declares_a_lost_process_before_jax_does(config):
    """JAX's runtime aborts every process with a stack trace when it declares one dead, which
    it may do after half its heartbeat timeout (its agent beats every half timeout); the
    watchdog's line must come first, at the settings a run actually starts with."""
    cfg = load_config(str(config) if config else None).distributed
    timeouts = runtime_timeouts(cfg)
    latest_watchdog = Watchdog.latest_verdict_s(cfg.heartbeat_timeout_s)
    assert timeouts["heartbeat_timeout_seconds"] / 2 >= latest_watchdog + 10
    assert timeouts["shutdown_timeout_seconds"] >= timeouts["heartbeat_timeout_seconds"]


@pytest.mark.parametrize("timeout_s", [1, 5, 20, 60, 600, 3600])
def test_jax_timeouts_follow_any_heartbeat_setting(timeout_s):
    timeouts = runtime_timeouts(DistributedConfig(heartbeat_timeout_s=timeout_s))
    assert timeouts["heartbeat_timeout_seconds"] / 2 >= Watchdog.latest_verdict_s(timeout_s) + 10
    assert timeouts["shutdown_timeout_seconds"] >= max(300, timeouts["heartbeat_timeout_seconds"])


def test_settings_that_differ_are_named_by_their_first_key():
    process_0 = shared_settings(tiny_config("optimizer.lr=1e-3"))
    other = shared_settings(tiny_config("optimizer.lr=3e-3", "train.steps=40"))
    assert first_difference(1, other, process_0) == (
        "process 1's config differs from process 0's at optimizer.lr: 0.003 against 0.001; "
        "start every process with the same config")
    assert first_difference(2, process_0, process_0) is None
    # How each process joins may differ; the heartbeat must not (a short one would call a
    # process with a long one lost).
    joined = shared_settings(tiny_config("optimizer.lr=1e-3", "distributed.process_id=1",
                                         "distributed.num_processes=2",
                                         "distributed.coordinator_address=h:1",
                                         "distributed.local_device_ids=[1]",
                                         "distributed.init_timeout_s=9"))
    assert first_difference(1, joined, process_0) is None
    slower = shared_settings(tiny_config("optimizer.lr=1e-3", "distributed.heartbeat_timeout_s=9"))
    assert "at distributed.heartbeat_timeout_s: 9 against 60" in first_difference(1, slower,
                                                                                 process_0)
    # A command's own settings, and the versions before everything else.
    assert "at bench.variant: [\"model.remat=full\"] against []" in first_difference(
        1, shared_settings(tiny_config(), {"bench.variant": ["model.remat=full"]}),
        shared_settings(tiny_config(), {"bench.variant": []}))
    assert first_difference(1, {**other, "version.jax": "0.0.0-other"}, process_0) == (
        f"process 1 runs jax 0.0.0-other against {process_0['version.jax']} on process 0; "
        "install the same versions on every host")
