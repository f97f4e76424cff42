"""The one function through which every weight matrix multiplies an activation.

The seven projections of a block and the vocabulary projection all call `matmul`, so a
different kind of weight multiply (int8 weights, fp8 operands) is a change here and in the
parameters it reads, not in the model's layers.

The kind of multiply (model.matmul) reaches `matmul` through `matmul_kind`, a context the model
enters around its layers, so the layers' calls stay the same for every kind. It is read while
JAX traces the forward pass; what it selects is then fixed in the traced program.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pjit_llm.models.fp8 import fp8_einsum

_KIND = contextvars.ContextVar("matmul_kind", default="default")


@contextlib.contextmanager
def matmul_kind(kind: str):
    """Within this context the named (block projection) matmuls are of `kind` (model.matmul):
    "default" multiplies in the compute dtype, "fp8" in fp8 (models/fp8.py)."""
    token = _KIND.set(kind)
    try:
        yield
    finally:
        _KIND.reset(token)


def matmul(equation: str, x: jax.Array, w: jax.Array, dtype, name: str | None = None) -> jax.Array:
    """`einsum(equation, x, w)` with the weight cast to the compute dtype. `name` tags the
    output for the remat policies that keep projections (model.remat=proj). Under
    matmul_kind("fp8") the named projections run in fp8; unnamed ones (the vocabulary
    projection) stay in the compute dtype."""
    if name is not None and _KIND.get() == "fp8":
        out = fp8_einsum(equation, x, w, jnp.dtype(dtype))
    else:
        out = jnp.einsum(equation, x, w.astype(dtype))
    return out if name is None else checkpoint_name(out, name)
