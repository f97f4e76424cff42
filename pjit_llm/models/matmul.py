"""The one function through which every weight matrix multiplies an activation, and the one
through which the embedding table is read.

The seven projections of a block and the vocabulary projection all call `matmul`, so a
different kind of weight multiply is a change here and in the parameters it reads, not in the
model's layers:
- an int8 weight (models/quantize.py) is multiplied as its int8 values in the compute dtype,
  and the product is scaled per output channel (the scale has the weight's dimensions that
  the equation keeps);
- kind="fp8" (model.matmul=fp8, which the blocks' projections pass) multiplies in float8
  with per-tensor scales and a custom gradient (models/fp8.py), each tensor's scale its own;
- kind=a DelayedScales (model.fp8_scaling=delayed: the module's amax histories,
  models/fp8_state.py) multiplies in float8 with the scales of the history held under `name`.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pjit_llm.models.fp8 import fp8_einsum, fp8_einsum_delayed
from pjit_llm.models.fp8_state import DelayedScales
from pjit_llm.models.quantize import Int8Weight


def matmul(equation: str, x: jax.Array, w, dtype, name: str | None = None,
           kind: str | DelayedScales = "default") -> jax.Array:
    """`einsum(equation, x, w)` with the weight cast to the compute dtype, or multiplied as
    `kind` says ("default", "fp8", or fp8 with the delayed scales of `kind`'s history `name`).
    `name` tags the output for the remat policies that keep projections (model.remat=proj)."""
    if isinstance(w, Int8Weight):
        out = _int8_matmul(equation, x, w, dtype)
    elif isinstance(kind, DelayedScales):
        out = fp8_einsum_delayed(equation, x, w, kind.history(name), jnp.dtype(dtype))
    elif kind == "fp8":
        out = fp8_einsum(equation, x, w, jnp.dtype(dtype))
    else:
        out = jnp.einsum(equation, x, w.astype(dtype))
    return out if name is None else checkpoint_name(out, name)


def _int8_matmul(equation: str, x: jax.Array, w: Int8Weight, dtype) -> jax.Array:
    inputs, out_sub = equation.replace(" ", "").split("->")
    w_sub = inputs.split(",")[1]
    kept = "".join(c for c in w_sub if c in out_sub)  # the scale's dimensions, in w's order
    if w.scale.ndim != len(kept):
        raise ValueError(f"int8 weight {w.values.shape} with scale {w.scale.shape} does not fit "
                         f"{equation}: its scale must span the kept dimensions {kept}")
    out = jnp.einsum(equation, x, w.values.astype(dtype))
    # the per-channel scale, in float32, on the (much smaller) product
    scaled = jnp.einsum(f"{out_sub},{kept}->{out_sub}", out.astype(jnp.float32), w.scale)
    return scaled.astype(out.dtype)


def take_rows(table_VD, tokens, dtype) -> jax.Array:
    """The embedding rows of `tokens` in the compute dtype (an int8 table: rows times their
    scales)."""
    if isinstance(table_VD, Int8Weight):
        rows = jnp.take(table_VD.values, tokens, axis=0).astype(jnp.float32)
        return (rows * jnp.take(table_VD.scale, tokens, axis=0)[..., None]).astype(dtype)
    return jnp.take(table_VD, tokens, axis=0).astype(dtype)
