"""The mesh axes, as data: one ordered list, outermost first.

Each axis has a size inside a process (`mesh.<name>`) and a number of pieces across processes
(`mesh.dcn_<name>`); the config section, the mesh, its checks and its messages are all made
from this list. Adding a kind of parallelism is one entry here plus the rules that map
logical axes onto it (settings.Rules); nothing else names the axes.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshAxis:
    name: str
    default: int  # size when the config leaves it out; -1 takes the devices the others leave
    shards: str  # what it splits, for help texts


MESH_AXES: tuple[MeshAxis, ...] = (
    MeshAxis("data", -1, "batch rows; parameters replicated"),
    MeshAxis("stage", 1, "the stacked layers, in contiguous blocks run as pipeline stages"),
    MeshAxis("fsdp", 1, "batch rows, and parameters with optimizer state"),
    MeshAxis("context", 1, "each sequence's positions in every activation (not parameters)"),
    MeshAxis("tensor", 1, "attention heads, MLP and vocabulary dimensions"),
    MeshAxis("expert", 1, "a mixture of experts' experts (parameters, optimizer state), and batch rows"),
)
AXIS_NAMES: tuple[str, ...] = tuple(a.name for a in MESH_AXES)
