"""The config sections that parallel/ reads: `mesh` (a size per mesh axis inside and across
processes, and the rule table from logical to mesh axes) and `distributed`. They live here,
below config.py, which assembles them with the other sections into the whole tree.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field

from pjit_llm.errors import UserError, require_positive
from pjit_llm.parallel.axes import AXIS_NAMES, MESH_AXES


@dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axes it is sharded over (empty: replicated).

    Activations use the same table; a mesh axis already taken by an earlier dimension of the
    same array is skipped, so `embed` is sharded over `fsdp` in parameters but not in
    activations whose batch already uses `fsdp`.
    """

    batch: tuple[str, ...] = ("data", "stage", "fsdp", "expert")
    length: tuple[str, ...] = ("context",)  # activations only: no parameter has a length
    embed: tuple[str, ...] = ("fsdp",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)
    head_dim: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ("tensor",)
    vocab: tuple[str, ...] = ("tensor",)
    layers: tuple[str, ...] = ("stage",)
    expert: tuple[str, ...] = ("expert",)  # a mixture of experts' stacked experts

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            axes = getattr(self, f.name)
            for a in axes:
                if a not in AXIS_NAMES:
                    close = difflib.get_close_matches(a, AXIS_NAMES, n=1, cutoff=0.5)
                    hint = f"did you mean {close[0]}? " if close else ""
                    raise UserError(f"mesh.rules.{f.name}: unknown mesh axis {a!r}; {hint}"
                                    f"use some of {', '.join(AXIS_NAMES)} or null")
            if len(set(axes)) != len(axes):
                raise UserError(f"mesh.rules.{f.name} names a mesh axis twice: {list(axes)}")


class _MeshSizes:
    """What MeshConfig adds to its generated fields: the sizes by axis, and their checks."""

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{axis: size} inside a process (prefix "") or across processes (prefix "dcn_")."""
        return {name: getattr(self, prefix + name) for name in AXIS_NAMES}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.sizes().values())

    @property
    def dcn_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes("dcn_").values())

    def validate(self) -> None:
        for prefix in ("", "dcn_"):
            sizes = self.sizes(prefix)
            for name, size in sizes.items():
                if size == 0 or size < -1:
                    raise UserError(f"mesh.{prefix}{name}={size} is not a size; use a positive "
                                    "integer or -1")
            if list(sizes.values()).count(-1) > 1:
                raise UserError(f"only one of {', '.join('mesh.' + prefix + n for n in sizes)} "
                                "may be -1")
        if self.emulate_devices < 0:
            raise UserError("mesh.emulate_devices must be >= 0")
        self.rules.validate()


# Sizes of the mesh axes (one may be -1 to take the remaining devices), then how many pieces
# of each lie in different processes (hosts): the product of the dcn_* sizes is the number
# of processes; all 1, each process's devices form one contiguous block. One field pair per
# entry of MESH_AXES, so a new axis needs no edit here.
MeshConfig = dataclasses.make_dataclass(
    "MeshConfig",
    [(a.name, int, a.default) for a in MESH_AXES]
    + [(f"dcn_{a.name}", int, 1) for a in MESH_AXES]
    + [("emulate_devices", int, 0),  # >0: run on that many emulated CPU devices
       ("rules", Rules, field(default_factory=Rules))],
    bases=(_MeshSizes,), frozen=True, namespace={"__module__": __name__})


@dataclass(frozen=True)
class DistributedConfig:
    """Explicit multi-process settings; unset, they come from SLURM, Kubernetes or
    JAX_COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID, else the run is one process."""

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = ()  # this process's devices (one process per GPU)
    init_timeout_s: int = 300  # give up joining after this long
    heartbeat_timeout_s: int = 60  # a process silent this long is lost: the others exit

    def validate(self) -> None:
        require_positive(self, "distributed", "init_timeout_s", "heartbeat_timeout_s")
        if self.num_processes < 0:
            raise UserError("distributed.num_processes must be >= 0")
