"""int8 weight-only quantization, symmetric and per output channel.

A weight w becomes `Int8Weight(values, scale)`: scale = max |w| over the dimensions its matmul
contracts, / 127 (float32, one per output channel), and values = round(w / scale) in int8, so
that |w - values * scale| <= scale / 2 everywhere. The values keep the weight's shape and
logical axes (so its sharding); the scale keeps the axes that are not contracted. Only the
parameter tree changes: `matmul` (models/matmul.py) multiplies by the int8 values in the
compute dtype and scales its output, so the model's layers read an `Int8Weight` where they read
a float weight. Which axes each weight contracts is the model family's table
(each family's `quantized_weights`, models/family.py).
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pjit_llm.errors import UserError
from pjit_llm.parallel.layout import is_variable

QUANTIZE_CHOICES = ("none", "int8")
Axes = tuple[str | None, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    values: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, the weight's shape without the contracted dimensions

    def __getitem__(self, index):
        # nnx.Variable hands out its value as `value[...]`
        if index is not Ellipsis:
            raise TypeError("an Int8Weight is read whole (`w[...]`), not indexed")
        return self

    @property
    def T(self) -> "Int8Weight":  # as jax.Array spells it
        return Int8Weight(self.values.T, self.scale.T)


def check_quantize(name: str, option: str = "--quantize") -> str:
    if name not in QUANTIZE_CHOICES:
        raise UserError(f"{option} {name} is not supported; use {' or '.join(QUANTIZE_CHOICES)}")
    return name


def quantize(w: jax.Array, contracted: tuple[int, ...]) -> Int8Weight:
    """`w` in int8 with one float32 scale per index of its dimensions not in `contracted`."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=contracted) / 127.0
    safe = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), contracted)  # all-zero channels
    values = jnp.clip(jnp.round(w32 / safe), -127, 127).astype(jnp.int8)
    return Int8Weight(values, scale)


def dequantize(w: Int8Weight, contracted: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return (w.values.astype(jnp.float32) * jnp.expand_dims(w.scale, contracted)).astype(dtype)


def contracted_dims(logical_axes: Axes, contracted_axes: Axes) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(logical_axes) if a in contracted_axes)


def _quantized_name(path, table: Mapping[str, Axes]) -> str | None:
    name = getattr(path[-1], "key", None) if path else None
    return name if name in table else None


def quantized_target(abstract_params, layout, table: Mapping[str, Axes]):
    """The abstract parameters (Variables of ShapeDtypeStructs, as `abstract_model` gives) with
    every weight `table` names as an Int8Weight: int8 values in the weight's sharding, float32
    scales in the sharding of its kept axes. A restore target and a plan for `quantize_params`."""
    def plan(path, v):
        name = _quantized_name(path, table)
        if name is None:
            return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                  sharding=layout.sharding(v.logical_axes)))
        axes = v.logical_axes
        kept = tuple(a for a in axes if a not in table[name])
        kept_shape = tuple(s for s, a in zip(v.shape, axes) if a not in table[name])
        return v.replace(Int8Weight(
            jax.ShapeDtypeStruct(v.shape, jnp.int8, sharding=layout.sharding(axes)),
            jax.ShapeDtypeStruct(kept_shape, jnp.float32, sharding=layout.sharding(kept))))

    return jax.tree_util.tree_map_with_path(plan, abstract_params, is_leaf=is_variable)


def quantize_params(params, layout, table: Mapping[str, Axes], abstract_params):
    """`params` (an nnx.State of float weights, sharded) with the weights `table` names
    quantized in place on the mesh (nothing gathered to one device). `abstract_params` carries
    the logical axes (the model's abstract state)."""
    target = quantized_target(abstract_params, layout, table)
    shardings = jax.tree.map(lambda a: a.sharding, target)
    contracted = {}
    for path, v in jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=is_variable):
        name = _quantized_name(path, table)
        if name is not None:
            contracted[jax.tree_util.keystr(path)] = contracted_dims(v.logical_axes, table[name])

    def convert(tree):
        def one(path, v):
            dims = contracted.get(jax.tree_util.keystr(path))
            return v if dims is None else v.replace(quantize(v[...], dims))
        return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_variable)

    return jax.jit(convert, out_shardings=shardings)(params)


def param_bytes(params) -> int:
    """Bytes of a parameter tree (int8 values and their scales counted as stored)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
