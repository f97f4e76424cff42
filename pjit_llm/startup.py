"""How every command that computes starts and ends: emulated devices where the config asks
for them, the distributed runtime (parallel/distributed.py) and, with several processes, their
agreement on the settings before anything is built (parallel/agreement.py); shutdown at the end.
"""

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import jax

from pjit_llm import __version__
from pjit_llm.config import Config
from pjit_llm.parallel import distributed
from pjit_llm.parallel.agreement import require_same_settings
from pjit_llm.parallel.distributed import Topology
from pjit_llm.parallel.mesh import use_emulated_devices

# Settings that differ between the processes of one run by design: how each one joins.
PER_PROCESS = ("distributed.coordinator_address", "distributed.num_processes",
               "distributed.process_id", "distributed.local_device_ids",
               "distributed.init_timeout_s")


@contextmanager
def started(cfg: Config, command: Mapping[str, object] | None = None) -> Iterator[Topology | None]:
    """This process's part of the run `cfg` describes, for the `with` block; refused unless
    every process runs process 0's config and `command` (the entry point's own settings outside
    the config, such as a benchmark's variants)."""
    use_emulated_devices(cfg.mesh.emulate_devices)
    topology = distributed.initialize(cfg.distributed)
    try:
        if topology is not None:
            require_same_settings(distributed.kv_client(), topology.process_id,
                                  topology.num_processes, shared_settings(cfg, command),
                                  cfg.distributed.init_timeout_s)
        yield topology
    finally:  # after a refusal too: every process refuses alike and meets at the barrier
        distributed.shutdown()


def shared_settings(cfg: Config, command: Mapping[str, object] | None = None) -> dict[str, object]:
    """The settings every process must share, by dotted key: the versions first (a different
    version explains any other difference), the config without PER_PROCESS, then `command`."""
    flat = {"version.pjit_llm": __version__, "version.jax": jax.__version__}
    _flatten(cfg.to_dict(), "", flat)
    for key in PER_PROCESS:
        del flat[key]
    flat.update(command or {})
    return json.loads(json.dumps(flat))  # as another process's arrive: lists, not tuples


def _flatten(tree: dict, prefix: str, into: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", into)
        else:
            into[prefix + key] = value
