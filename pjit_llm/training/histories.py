"""fp8 amax histories (model.fp8_scaling=delayed, models/fp8_state.py) where a run's state
meets parameters saved without them or with others: a checkpoint saved under current scaling
holds none, one saved with another model.fp8_amax_history holds another length, a run turned
back to current scaling has no place for those its checkpoint holds, and train.init_from
reads parameters alone. The run keeps the histories it can read, starts the others empty (the
first step then quantizes with scale 1, and each history fills as the steps go), and drops
those it has no place for. Anything else that differs is still refused by the restore.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pjit_llm.models.fp8_state import AmaxHistory, is_history, is_history_path

Path = tuple[str, ...]


def saved_shapes(saved_params: dict) -> dict[Path, tuple[int, ...]]:
    """{variable path: shape} of the parameters in a checkpoint's Orbax metadata tree (each
    variable saved as {"value": array})."""
    found = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(saved_params)[0]:
        path = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
        if path[-1] == "value":
            found[path[:-1]] = tuple(leaf.shape)
    return found


def readable(abstract_params: nnx.State, saved: dict[Path, tuple[int, ...]]) -> nnx.State:
    """What to read of a checkpoint holding `saved` into a run whose parameters are
    `abstract_params`: those, less the histories the checkpoint lacks, and with the histories
    it holds in their saved shape where the run has none of that shape (read, then replaced
    or dropped by `fitted`: an Orbax restore reads a checkpoint's tree whole)."""
    flat = {_key(path): v for path, v in nnx.to_flat_state(abstract_params)}
    keep = {path: v for path, v in flat.items() if not is_history(v) or path in saved}
    replicated = NamedSharding(_mesh(abstract_params), PartitionSpec())
    for path, shape in saved.items():
        if is_history_path(path) and (path not in flat or shape != _shape(flat[path])):
            keep[path] = AmaxHistory(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated))
    if keep.keys() == flat.keys() and all(keep[p] is flat[p] for p in flat):
        return abstract_params  # the checkpoint holds what the run has
    return nnx.from_flat_state(keep)


def fitted(params: nnx.State, abstract_params: nnx.State) -> tuple[nnx.State, list[str]]:
    """(`params` with exactly the variables of `abstract_params`: the histories it lacks or
    holds in another shape made empty in their shardings, those `abstract_params` lacks
    dropped; the names of the histories made empty)."""
    have = {_key(path): v for path, v in nnx.to_flat_state(params)}
    want = {_key(path): v for path, v in nnx.to_flat_state(abstract_params)}
    if have.keys() == want.keys() and all(_shape(have[p]) == _shape(v) for p, v in want.items()):
        return params, []  # nothing to add or drop
    out, fresh = {}, []
    for path, v in want.items():
        if is_history(v) and (path not in have or _shape(have[path]) != _shape(v)):
            a = v.get_value()  # zeros made by every process, for its own shards
            out[path] = v.replace(jax.jit(partial(jnp.zeros, a.shape, a.dtype),
                                          out_shardings=a.sharding)())
            fresh.append("/".join(path))
        else:
            out[path] = have[path]
    return nnx.from_flat_state(out), fresh


def _shape(v: nnx.Variable) -> tuple[int, ...]:
    return tuple(v.get_value().shape)


def _key(path) -> Path:
    return tuple(str(k) for k in path)


def _mesh(abstract_params: nnx.State):
    return jax.tree.leaves(abstract_params)[0].sharding.mesh
