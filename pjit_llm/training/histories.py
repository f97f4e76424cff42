"""fp8 amax histories (model.fp8_scaling=delayed, models/fp8_state.py) where a run's state
meets parameters saved without them or with others: a checkpoint saved under current scaling
holds none, one saved with another model.fp8_amax_history holds another length, a run turned
back to current scaling has no place for those its checkpoint holds, and train.init_from
reads parameters alone. The run keeps the histories it can read, starts the others empty (the
first step then quantizes with scale 1, and each history fills as the steps go), and drops
those it has no place for. Anything else that differs is still refused by the restore.
"""

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
    `abstract_params`: those, less the histories the checkpoint lacks or holds in another
    shape, plus the histories it holds that the run has no place for (read, then dropped by
    `fitted`: an Orbax restore reads a checkpoint's tree whole)."""
    flat = {_key(path): v for path, v in abstract_params.flat_state()}
    keep = {path: v for path, v in flat.items()
            if not is_history(v) or saved.get(path) == tuple(v.get_value().shape)}
    replicated = NamedSharding(_mesh(abstract_params), PartitionSpec())
    for path, shape in saved.items():
        if path not in flat and is_history_path(path):
            keep[path] = AmaxHistory(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated))
    return nnx.State.from_flat_path(keep)


def fitted(params: nnx.State, abstract_params: nnx.State) -> tuple[nnx.State, list[str]]:
    """(`params` with exactly the variables of `abstract_params`: the histories it lacks or
    holds in another shape made empty in their shardings, those `abstract_params` lacks
    dropped; the names of the histories made empty)."""
    have = {_key(path): v for path, v in params.flat_state()}
    if set(have) == {_key(path) for path, _ in abstract_params.flat_state()} and all(
            tuple(v.get_value().shape) == tuple(have[_key(path)].get_value().shape)
            for path, v in abstract_params.flat_state()):
        return params, []  # nothing to add or drop
    out, fresh = {}, []
    for path, v in abstract_params.flat_state():
        got, want = have.get(_key(path)), v.get_value()
        if is_history(v) and (got is None or tuple(got.get_value().shape) != tuple(want.shape)):
            out[path] = v.replace(jnp.zeros(want.shape, want.dtype, device=want.sharding))
            fresh.append("/".join(map(str, path)))
        else:
            out[path] = got
    return nnx.State.from_flat_path(out), fresh


def _key(path) -> Path:
    return tuple(str(k) for k in path)


def _mesh(abstract_params: nnx.State):
    return jax.tree.leaves(abstract_params)[0].sharding.mesh
