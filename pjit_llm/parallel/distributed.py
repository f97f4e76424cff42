"""Start JAX's distributed runtime from explicit settings or the cluster's environment.

Sources, first match wins: the `distributed` config section (or CLI overrides of it), SLURM,
a Kubernetes indexed Job / JobSet, the generic JAX_COORDINATOR_ADDRESS, NUM_PROCESSES and
PROCESS_ID variables. With none of them the run is a single process.

A watchdog thread then keeps a heartbeat in the coordinator's key-value store: when another
process stops beating (killed, crashed, out of memory) or the coordinator cannot be reached,
this process prints one line naming the lost process and exits with status 3 instead of
waiting forever in a collective. JAX's runtime watches heartbeats too and aborts every process
with a stack trace when it declares one dead; its timeouts are derived from ours
(`runtime_timeouts`) so that the watchdog always speaks first.

Before anything else every process checks that it runs the same config as process 0
(agreement.py): a process started with other settings would compute something else, fail in
a collective or hang.

An entry point calls `shutdown()` after its last collective and checkpoint wait: the runtime's
shutdown barrier, then the watchdog stops. A daemon thread still inside the runtime's client
at interpreter exit aborts the process (SIGABRT), so the thread must be gone by then.
"""

import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from pjit_llm.parallel.settings import DistributedConfig
from pjit_llm.errors import UserError, first_line

DEFAULT_PORT = 12345
LOST_PROCESS_EXIT = 3
# JAX's agent beats every half of `heartbeat_timeout_seconds` and its service checks each
# second, so the runtime may declare a process dead as early as half that timeout after its
# death (seen: 47 s after a kill with 90 s). Half of JAX's timeout is set this far beyond
# the watchdog's latest verdict.
RUNTIME_MARGIN_S = 15
JAX_SHUTDOWN_TIMEOUT_S = 300  # jax.distributed's default wait for the others at the end
_watchdog: "Watchdog | None" = None


@dataclass(frozen=True)
class Topology:
    source: str  # which settings were used
    coordinator: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def detect(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> Topology | None:
    """The multi-process topology to start, or None for a single process."""
    if cfg.coordinator_address or cfg.num_processes:
        if not (cfg.coordinator_address and cfg.num_processes > 0 and cfg.process_id >= 0):
            raise UserError("distributed.coordinator_address, distributed.num_processes and "
                            "distributed.process_id must be set together")
        return Topology("config", cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                        cfg.local_device_ids or None)
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        host = first_host(nodes)
        port = int(env.get("PJIT_LLM_COORDINATOR_PORT", DEFAULT_PORT))
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", "0") or 0)
        local = (int(env["SLURM_LOCALID"]),) if per_node > 1 and "SLURM_LOCALID" in env else None
        return Topology("SLURM", f"{host}:{port}", int(env["SLURM_NTASKS"]),
                        int(env["SLURM_PROCID"]), local)
    generic = env.get("JAX_COORDINATOR_ADDRESS")
    count = env.get("NUM_PROCESSES") or env.get("JAX_NUM_PROCESSES")
    if "JOB_COMPLETION_INDEX" in env and generic and count:
        return Topology("Kubernetes", generic, int(count), int(env["JOB_COMPLETION_INDEX"]))
    pid = env.get("PROCESS_ID") or env.get("JAX_PROCESS_ID")
    if generic and count and pid is not None:
        return Topology("environment", generic, int(count), int(pid))
    if generic or count or pid:
        raise UserError("JAX_COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID must be set "
                        "together (or use distributed.* settings)")
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as `gpu[007-010,012],cpu1`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def initialize(joining: DistributedConfig) -> Topology | None:
    """Start the distributed runtime if the settings or environment ask for it (None: one
    process), with the watchdog that names a lost process."""
    topology = detect(joining)
    if topology is None:
        return None
    import jax
    if not 0 <= topology.process_id < topology.num_processes:
        raise UserError(f"process id {topology.process_id} is outside 0..{topology.num_processes - 1}")
    if topology.process_id != 0:  # the runtime aborts the process when it cannot connect
        _wait_for_coordinator(topology, joining.init_timeout_s)
    try:
        jax.distributed.initialize(
            topology.coordinator, topology.num_processes, topology.process_id,
            local_device_ids=list(topology.local_device_ids) if topology.local_device_ids else None,
            initialization_timeout=joining.init_timeout_s, **runtime_timeouts(joining))
    except Exception as e:  # the runtime raises bare XlaRuntimeError/RuntimeError here
        first = first_line(e)
        raise UserError(f"could not join the distributed run at {topology.coordinator} as process "
                        f"{topology.process_id} of {topology.num_processes} within "
                        f"{joining.init_timeout_s}s ({first}); check that every process is "
                        "started and the coordinator's host and port are reachable") from None
    global _watchdog
    _watchdog = Watchdog(topology, joining.heartbeat_timeout_s)
    _watchdog.start()
    return topology


def runtime_timeouts(cfg: DistributedConfig) -> dict[str, int]:
    """The timeouts passed to jax.distributed.initialize, derived from the watchdog's so that
    the runtime never declares a process dead (a C++ abort) before the watchdog has."""
    heartbeat = 2 * (math.ceil(Watchdog.latest_verdict_s(cfg.heartbeat_timeout_s))
                     + RUNTIME_MARGIN_S)
    # The shutdown barrier must outlast it too: a process lost there is the watchdog's to report.
    return {"heartbeat_timeout_seconds": heartbeat,
            "shutdown_timeout_seconds": max(JAX_SHUTDOWN_TIMEOUT_S, heartbeat)}


def shutdown() -> None:
    """Leave the distributed run after the last collective and checkpoint wait: the runtime's
    shutdown barrier with the other processes (process 0 stops the coordinator last), then the
    watchdog stops. It beats until then: while this process waits in the barrier the others
    do not count it lost, and a process that dies meanwhile still makes this one exit with
    LOST_PROCESS_EXIT instead of hanging. Does nothing in a single-process run or when repeated."""
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is None:
        return
    import jax
    try:
        jax.distributed.shutdown()
    except Exception as e:  # the coordinator is gone: leave anyway
        print(f"warning: the distributed runtime did not shut down cleanly ({first_line(e)})",
              file=sys.stderr, flush=True)
    finally:
        watchdog.stop()


def _wait_for_coordinator(topology: Topology, timeout_s: int) -> None:
    host, _, port = topology.coordinator.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise UserError(
                    f"could not reach the coordinator {topology.coordinator} (process 0) from "
                    f"process {topology.process_id} within {timeout_s}s; start process 0, check "
                    "its host and port, or raise distributed.init_timeout_s") from None
            time.sleep(0.5)


def describe(topology: Topology | None) -> str:
    import jax
    where = ("single process" if topology is None else
             f"process {topology.process_id} of {topology.num_processes} (from {topology.source}; "
             f"coordinator {topology.coordinator})")
    return (f"{where}: {jax.local_device_count()} local of {jax.device_count()} "
            f"{jax.devices()[0].platform} devices")


class Watchdog(threading.Thread):
    """Beats every few seconds and exits the process when another one has gone quiet."""

    def __init__(self, topology: Topology, timeout_s: int):
        super().__init__(name="pjit_llm-watchdog", daemon=True)
        self.topology, self.timeout_s = topology, timeout_s
        self.interval = self.interval_s(timeout_s)
        self._stopping = threading.Event()

    @staticmethod
    def interval_s(timeout_s: float) -> float:
        return max(0.5, timeout_s / 10)

    @classmethod
    def latest_verdict_s(cls, timeout_s: float) -> float:
        """The longest a process can be dead before the watchdog says so: its last beat is
        first seen up to one interval late, then the timeout, then up to one more interval
        until the check that notices it."""
        return timeout_s + 2 * cls.interval_s(timeout_s)

    def stop(self) -> None:
        """Stop beating and wait until the thread has left the runtime's client."""
        self._stopping.set()
        self.join(self.timeout_s)  # one beat's calls, or their failure, take far less

    @staticmethod
    def _key(process: int) -> str:
        return f"pjit_llm/heartbeat/{process}"

    def run(self):
        client = kv_client()
        me, n = self.topology.process_id, self.topology.num_processes
        last_seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
        beat = 0
        unreachable_since = None
        while not self._stopping.is_set():
            beat += 1
            try:
                client.key_value_set(self._key(me), str(beat), allow_overwrite=True)
                for p in last_seen:
                    value = kv_try_get(client, self._key(p))
                    if value != last_seen[p][0]:
                        last_seen[p] = (value, time.monotonic())
                unreachable_since = None
            except Exception:  # the coordinator (process 0's host) is gone
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self.timeout_s:
                    self._lost(0, "the coordinator cannot be reached")
            now = time.monotonic()
            for p, (_, seen) in last_seen.items():
                if now - seen > self.timeout_s:
                    self._lost(p, f"no heartbeat for {now - seen:.0f}s")
            self._stopping.wait(self.interval)

    def _lost(self, process: int, why: str):
        exit_lost(process, self.topology.num_processes, why)


def exit_lost(process: int, num_processes: int, why: str):
    """Print one line naming the lost process and leave at once with LOST_PROCESS_EXIT (a
    clean exit would wait in collectives and barriers that can no longer complete)."""
    print(f"error: lost process {process} of {num_processes} ({why}); stopping this process "
          "too. Restart all processes to resume from the last checkpoint",
          file=sys.stderr, flush=True)
    os._exit(LOST_PROCESS_EXIT)


def kv_client():
    """The distributed runtime's key-value store client (process 0 hosts the store)."""
    # jax 0.10 has no public accessor for the client (jax.distributed offers only initialize,
    # is_initialized and shutdown), so this is the one place that reads the private state.
    from jax._src.distributed import global_state
    return global_state.client


def kv_try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # not written yet
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise


def kv_set_once(client, key: str, value: str) -> bool:
    """Store `value` unless `key` holds one already; False when another process was first.
    Any other failure (the coordinator gone) is raised."""
    try:
        client.key_value_set(key, value)  # without overwrite
        return True
    except Exception as e:  # the runtime's bare JaxRuntimeError; the status code leads
        if "ALREADY_EXISTS" in first_line(e):
            return False
        raise
