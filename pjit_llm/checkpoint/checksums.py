"""Checksums of saved arrays, computed on the device and independent of the mesh.

Orbax (0.12, OCDBT) restores a data file with flipped bytes without a word, so every save
records one checksum per array of the training state beside it and every restore recomputes
them. Each array's bits, read as unsigned integers, are weighted by an odd number per
element (2*i+1 over the flattened global index i) and summed in uint32: wrap-around integer
sums are exact in any reduction order, so a checkpoint saved on one mesh verifies restored
onto another, and an odd weight is invertible mod 2**32, so any single changed element
changes the sum. One jitted pass over the whole tree, a few bytes back to the host.

Verified: the full training state in `Checkpoints.restore`, the parameters alone in
`runs.restore_params`. Not verified: exports and imported parameters (written without
checksums), single parameters read on the host by `convert`, and checkpoints saved before
checksums existed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Saved beside the state in the same Orbax checkpoint; METHOD names the formula above so a
# future change of formula is recognised instead of reported as damage.
ITEM = "checksums"
METHOD = "uint32 sum of bits x (2i+1)"


def tree_keys(tree) -> list[str]:
    """'/'-joined key paths of a tree's leaves, e.g. 'params/blocks/attn/wq/value'."""
    def name(k):
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_uint32(x):
    """The bits of `x` as uint32 elements (8-byte types give two per element)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _array_checksum(x):
    bits = _as_uint32(x)
    # The flattened index from one iota per dimension, not a reshape: it keeps `bits` in the
    # array's own sharding, so only the final sum crosses devices.
    index = jnp.zeros(bits.shape, jnp.uint32)
    for dim in range(bits.ndim):
        stride = math.prod(bits.shape[dim + 1:]) % 2**32
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves):
    return jnp.stack([_array_checksum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


def compute(tree) -> dict:
    """The JSON record of `tree`'s checksums: {'method': METHOD, 'arrays': {key: checksum}}.

    Waits for the arrays to be computed (a save's copy off the device would wait for them
    too), then for one pass over them; the transfer back is 4 bytes per array."""
    values = np.asarray(jax.device_get(_checksums(jax.tree.leaves(tree)))).tolist()
    return {"method": METHOD, "arrays": dict(zip(tree_keys(tree), values))}


def first_mismatch(saved: dict, tree, prefix: str = "") -> str | None:
    """None when `tree`'s arrays match the checksums `saved` with them, else a short reason
    naming the first array that does not. `prefix` locates `tree` in the saved tree (the
    parameters alone are under 'params/'). A record of another method is not checked."""
    if saved.get("method") != METHOD:
        return None
    actual = compute(tree)["arrays"]
    for key, value in actual.items():
        expected = saved["arrays"].get(prefix + key)
        if expected is None:
            return f"no checksum was saved for {prefix + key}"
        if expected != value:
            return f"{prefix + key} differs from its checksum at save"
    return None
