"""The device mesh: the axes of parallel/axes.py sized from the config, -1 filling the rest.

Across hosts, `mesh.dcn_*` say how many pieces of each axis lie in different processes
(data parallel across nodes, FSDP within one, for instance); the rest of each axis is
inside a process. Without them, each process's devices form a contiguous block.
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from pjit_llm.parallel.settings import MeshConfig
from pjit_llm.errors import UserError
from pjit_llm.parallel.axes import AXIS_NAMES


def _fill(sizes, total: int, what: str, prefix: str = "") -> tuple[int, ...]:
    """Replace a -1 by what the other sizes leave; refuse a product that is not `total`."""
    sizes = list(sizes)
    named = ", ".join(f"{prefix}{n}={s}" for n, s in zip(AXIS_NAMES, sizes))
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if total % rest:
            raise UserError(f"mesh ({named}) cannot fill {total} {what}: {rest} does not "
                            f"divide {total}; choose sizes whose product divides it")
        sizes[sizes.index(-1)] = total // rest
    if math.prod(sizes) != total:
        raise UserError(f"mesh ({named}) needs {math.prod(sizes)} {what} but {total} "
                        f"are available; make the sizes multiply to {total} or set one to -1")
    return tuple(sizes)


def use_emulated_devices(count: int) -> None:
    """Run on `count` emulated CPU devices (0: leave the platform alone). Must come before
    JAX first touches a backend."""
    if count:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    return _fill(cfg.shape, num_devices, "devices")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all), GSPMD (Auto) axes so XLA propagates shardings."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(cfg, len(devices))
    if all(n == 1 for n in cfg.dcn_shape):
        # Sorting by process keeps each process's devices contiguous along the leading axes.
        devices.sort(key=lambda d: (d.process_index, d.id))
        array = np.array(devices).reshape(shape)
    else:
        array = _hybrid(cfg, shape, devices)
    return Mesh(array, AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES))


def _hybrid(cfg: MeshConfig, shape, devices) -> np.ndarray:
    processes = len({d.process_index for d in devices})
    dcn = _fill(cfg.dcn_shape, processes, "processes", prefix="dcn_")
    for name, size, across in zip(AXIS_NAMES, shape, dcn):
        if size % across:
            raise UserError(f"mesh.{name}={size} cannot be split into mesh.dcn_{name}={across} "
                            "pieces across processes; make dcn_* divide the axis sizes")
    ici = tuple(s // a for s, a in zip(shape, dcn))
    per_process = len(devices) // processes
    if math.prod(ici) != per_process:
        raise UserError(f"mesh inside each process {ici} needs {math.prod(ici)} devices but each "
                        f"process has {per_process}; adjust mesh sizes or mesh.dcn_*")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)


def describe(mesh: Mesh) -> str:
    sizes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return f"mesh {sizes} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
