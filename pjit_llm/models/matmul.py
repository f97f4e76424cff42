"""The one function through which every weight matrix multiplies an activation.

The seven projections of a block and the vocabulary projection all call `matmul`, so a
different kind of weight multiply (int8 weights, fp8 operands) is a change here and in the
parameters it reads, not in the model's layers.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def matmul(equation: str, x: jax.Array, w: jax.Array, dtype, name: str | None = None) -> jax.Array:
    """`einsum(equation, x, w)` with the weight cast to the compute dtype. `name` tags the
    output for the remat policies that keep projections (model.remat=proj)."""
    out = jnp.einsum(equation, x, w.astype(dtype))
    return out if name is None else checkpoint_name(out, name)
