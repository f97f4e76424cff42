"""The device mesh: axes (data, fsdp, tensor) sized from the config, -1 filling the rest."""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from pjit_llm.config import MESH_AXES, MeshConfig
from pjit_llm.errors import UserError


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Replace a -1 by what the other axes leave; refuse a product that is not num_devices."""
    shape = list(cfg.shape)
    named = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, shape))
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if num_devices % rest:
            raise UserError(f"mesh ({named}) cannot fill {num_devices} devices: {rest} does not "
                            f"divide {num_devices}; choose sizes whose product divides it")
        shape[shape.index(-1)] = num_devices // rest
    if math.prod(shape) != num_devices:
        raise UserError(f"mesh ({named}) needs {math.prod(shape)} devices but {num_devices} "
                        f"are available; make the sizes multiply to {num_devices} or set one to -1")
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all), GSPMD (Auto) axes so XLA propagates shardings."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(cfg, len(devices))
    # Sorting by process keeps each process's devices contiguous along the leading axes.
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    sizes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return f"mesh {sizes} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
