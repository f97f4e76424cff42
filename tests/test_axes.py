"""The mesh axes as data: the config section, the mesh and its messages follow the one list."""

import dataclasses

import jax

from pjit_llm.config import MeshConfig
from pjit_llm.parallel.axes import AXIS_NAMES, MESH_AXES
from pjit_llm.parallel.mesh import make_mesh


def test_config_and_mesh_follow_the_list_of_axes():
    fields = {f.name: f.default for f in dataclasses.fields(MeshConfig)}
    for axis in MESH_AXES:
        assert fields[axis.name] == axis.default and fields[f"dcn_{axis.name}"] == 1
    assert MeshConfig().shape == tuple(a.default for a in MESH_AXES)
    assert make_mesh(MeshConfig()).axis_names == AXIS_NAMES == (
        "data", "stage", "fsdp", "context", "tensor", "expert")
    assert dict(make_mesh(MeshConfig()).shape)["data"] == jax.device_count()  # -1 fills
