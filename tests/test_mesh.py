"""The device mesh: -1 fills the remaining devices, impossible meshes are refused, hybrid
(across-process) sizes are checked."""

import jax
import pytest

from pjit_llm.config import MeshConfig
from pjit_llm.errors import UserError
from pjit_llm.parallel.mesh import make_mesh, resolve_shape


# Sizes in the order of the mesh axes: data, stage, fsdp, context, tensor, expert.
@pytest.mark.parametrize("sizes, expected", [
    ((-1, 1, 1, 1, 1, 1), (8, 1, 1, 1, 1, 1)), ((1, 1, -1, 1, 1, 1), (1, 1, 8, 1, 1, 1)),
    ((2, 1, -1, 1, 2, 1), (2, 1, 2, 1, 2, 1)), ((1, 1, 2, 1, -1, 1), (1, 1, 2, 1, 4, 1)),
    ((2, 1, 2, 1, 2, 1), (2, 1, 2, 1, 2, 1)), ((1, -1, 2, 1, 1, 1), (1, 4, 2, 1, 1, 1)),
    ((1, 1, 1, -1, 2, 1), (1, 1, 1, 4, 2, 1)),
])
def test_minus_one_fills_the_remaining_devices(sizes, expected):
    assert resolve_shape(MeshConfig(*sizes), 8) == expected


@pytest.mark.parametrize("sizes, message", [
    ((3, 1, 1, 1, 1), "needs 3 devices but 8 are available"),
    ((2, 1, 2, 1, 4), "needs 16 devices but 8 are available"),
    ((3, 1, -1, 1, 1), "cannot fill 8 devices: 3 does not divide 8"),
    ((1, 3, -1, 1, 1), "cannot fill 8 devices: 3 does not divide 8"),
])
def test_impossible_meshes_are_refused(sizes, message):
    with pytest.raises(UserError, match=message):
        resolve_shape(MeshConfig(*sizes), 8)


def test_mesh_axes_and_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "context": 1, "tensor": 2,
                                "expert": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    single = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert single.devices.size == 1


def test_hybrid_mesh_checks():
    with pytest.raises(UserError, match="needs 2 processes but 1 are available"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, dcn_data=2))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, dcn_data=-1))
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "context": 1, "tensor": 2,
                                "expert": 1}

