"""The one place that turns logical axis names into shardings.

Parameters carry logical axis names in their `logical_axes` metadata; activations name
theirs at block boundaries through `Layout.constrain`. The rule table in the config maps each
logical axis to mesh axes. A mesh axis of size 1 is left out of specs, and a mesh axis is used
at most once per array (the first dimension that asks for it wins).
"""

import dataclasses
import math
from dataclasses import dataclass

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pjit_llm.parallel.settings import MeshConfig, Rules
from pjit_llm.errors import UserError


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: Rules
    excluded: frozenset[str] = frozenset()  # mesh axes this layout never shards over

    def without(self, axis: str) -> "Layout":
        """The same rules with `axis` left out: for code that runs inside a transform that
        owns that axis (the pipeline's stages)."""
        return dataclasses.replace(self, excluded=self.excluded | {axis})

    def mesh_axes(self, logical: str | None, taken: set[str] = frozenset()) -> tuple[str, ...]:
        if logical is None:
            return ()
        return tuple(a for a in getattr(self.rules, logical)
                     if self.mesh.shape[a] > 1 and a not in taken and a not in self.excluded)

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        taken: set[str] = set()
        entries = []
        for logical in logical_axes:
            axes = self.mesh_axes(logical, taken)
            taken.update(axes)
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*entries)

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def constrain(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes))

    def shards(self, logical: str) -> int:
        """How many pieces a dimension with this logical axis is cut into (alone in its array)."""
        return math.prod(self.mesh.shape[a] for a in self.mesh_axes(logical))


def constrain(layout: Layout | None, x: jax.Array, logical_axes) -> jax.Array:
    """`x` constrained to `layout`'s sharding of these axes; as it is without a layout (a
    model built outside any mesh)."""
    return x if layout is None else layout.constrain(x, logical_axes)


def is_variable(x) -> bool:
    """The leaves of a parameter tree: pass as `is_leaf` to keep their logical axes."""
    return isinstance(x, nnx.Variable)


def param_shardings(layout: Layout, abstract_params):
    """NamedShardings for a tree of nnx.Variables whose metadata names their logical axes."""
    return jax.tree.map(lambda v: v.replace(layout.sharding(v.logical_axes)),
                        abstract_params, is_leaf=is_variable)


def check_divisible(layout: Layout, abstract_params) -> None:
    """Refuse a parameter dimension that its mesh axes do not divide, naming both."""
    for path, v in jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=is_variable):
        spec = layout.spec(v.logical_axes)
        for dim, (size, axes, logical) in enumerate(zip(v.shape, spec, v.logical_axes)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            n = math.prod(layout.mesh.shape[a] for a in axes)
            if size % n:
                name = jax.tree_util.keystr(path, simple=True, separator=".")
                raise UserError(
                    f"parameter {name} dimension {dim} ({logical}={size}) is not divisible by "
                    f"mesh axes {'x'.join(axes)}={n}; change the model size, the mesh, or "
                    f"mesh.rules.{logical}")


def attention_kv_heads(layout: Layout | None, num_heads: int, num_kv_heads: int) -> int:
    """How many key/value heads attention runs with on this layout. The model's own when they
    split over the shards of `heads`; else each is repeated (the fewest times that make the
    count divide over those shards), so that every shard holds the key/value head its query
    heads use, as Megatron and MaxText replicate them when tensor parallelism outnumbers them.
    Query head h still reads head h // (num_heads / num_kv_heads) of the model."""
    shards = 1 if layout is None else layout.shards("heads")
    used = math.lcm(num_kv_heads, shards)
    if num_heads % used:  # only when the shards do not divide the query heads
        axes = "x".join(layout.mesh_axes("heads"))
        raise UserError(f"model.num_heads={num_heads} query heads (model.num_kv_heads="
                        f"{num_kv_heads}) do not split over mesh axes {axes}={shards}; use a "
                        f"{axes} size that divides {num_heads} (key/value heads are repeated "
                        "across the shards when there are fewer)")
    return used


def fit_kv_heads(layout: Layout, num_heads: int, num_kv_heads: int) -> Layout:
    """The layout a model with these head counts runs on: when attention repeats the key/value
    heads (attention_kv_heads), their projections are kept whole on every shard of `heads`
    (the parameters' `kv_heads` dimension is not sharded; checkpoints keep the true heads) and
    each shard computes its own repeated heads from them."""
    if attention_kv_heads(layout, num_heads, num_kv_heads) == num_kv_heads:
        return layout
    return dataclasses.replace(layout, rules=dataclasses.replace(layout.rules, kv_heads=()))


def check_batch(layout: Layout, micro_batch: int) -> None:
    """Each micro-batch must split evenly over the mesh axes that carry `batch`."""
    n = layout.shards("batch")
    if micro_batch % n:
        axes = "x".join(layout.mesh_axes("batch"))
        raise UserError(f"micro-batch of {micro_batch} sequences (data.batch_size / "
                        f"train.grad_accum) is not divisible by the {n} batch shards ({axes}); "
                        f"use a batch size that is a multiple of {n} x train.grad_accum")


def bytes_per_device(tree) -> int:
    """Bytes of this tree held by one device (the first of the first array's shards)."""
    leaves = jax.tree.leaves(tree)
    device = leaves[0].addressable_shards[0].device
    return sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == device)


def conversion_mesh(embed_dim: int) -> tuple[MeshConfig, list[jax.Device]]:
    """The mesh import and export place a model on: FSDP over as many devices as the width
    divides (`embed` is the only axis the default rules shard on it), so no device needs
    room for the whole model. Returns the mesh config and the devices it spans."""
    n = jax.device_count()
    fsdp = max(k for k in range(1, n + 1) if n % k == 0 and embed_dim % k == 0)
    return MeshConfig(data=1, fsdp=fsdp), jax.devices()[:fsdp]
