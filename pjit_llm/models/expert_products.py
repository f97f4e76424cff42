"""The experts' gated MLPs over rows already grouped by expert: the matrix products of a
mixture of experts (models/moe.py), with nothing of routing or of the mesh.

`grouped_mlp` takes rows sorted by expert with each group's size, dropless. Two ways to
multiply them, the same numbers:
- "ragged_dot": `jax.lax.ragged_dot`, one grouped product per weight. GPU and TPU lower it to
  a grouped matrix product; XLA:CPU lowers it to a dense product against every expert, masked,
  which costs E times the FLOPs and the memory.
- "blocks": the groups padded to a multiple of a block of rows, a scan over the blocks, each a
  plain product with its expert's weights (read by index); blocks past the last group are
  skipped. The work is the rows' plus the padding, whatever the backend: the default on CPU.
`batched_mlp` takes a fixed number of rows per expert (capacity mode): one batched product.

An int8 weight (models/quantize.py) multiplies by its values in the compute dtype and scales
the (smaller) product per expert and output channel.
Shapes in names: R rows, E experts, C rows per expert, D embed, F expert width, N blocks,
b rows per block.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pjit_llm.models.layers import ACTIVATIONS
from pjit_llm.models.quantize import Int8Weight
from pjit_llm.models.target import target_backend

EXPERT_MATMULS = ("auto", "ragged_dot", "blocks")


def resolve_matmul(choice: str) -> str:
    """model.expert_matmul as it runs here: "auto" is ragged_dot where the backend lowers it
    to a grouped product, blocks on CPU."""
    if choice != "auto":
        return choice
    return "blocks" if target_backend() == "cpu" else "ragged_dot"


def expert_count(w) -> int:
    return (w.values if isinstance(w, Int8Weight) else w).shape[0]


def grouped_mlp(x_RD, sizes_E, gate_EDF, up_EDF, down_EFD, activation: str, dtype,
                matmul: str) -> jax.Array:
    """Each group of rows of `x_RD` (sorted by expert, the first sizes_E[0] rows expert 0's,
    and so on) through its expert's gated MLP; (R, D) in `dtype`, zero in the rows past the
    last group."""
    weights = (gate_EDF, up_EDF, down_EFD)
    if resolve_matmul(matmul) == "blocks":
        y_RD = _by_blocks(x_RD.astype(dtype), sizes_E, weights, activation, dtype)
    else:
        y_RD = _by_ragged_dot(x_RD.astype(dtype), sizes_E, weights, activation, dtype)
    in_group_R = jnp.arange(x_RD.shape[0]) < jnp.sum(sizes_E)
    return jnp.where(in_group_R[:, None], y_RD, 0).astype(dtype)


def batched_mlp(x_ECD, gate_EDF, up_EDF, down_EFD, activation: str, dtype) -> jax.Array:
    """Each expert's C rows through its gated MLP: (E, C, D) in `dtype`."""
    def product(name, a_ECX, w_EXY):
        if not isinstance(w_EXY, Int8Weight):
            return checkpoint_name(jnp.einsum("ECX,EXY->ECY", a_ECX, w_EXY.astype(dtype)), name)
        out_ECY = jnp.einsum("ECX,EXY->ECY", a_ECX, w_EXY.values.astype(dtype))
        return checkpoint_name(_scaled(out_ECY, w_EXY.scale[:, None, :], dtype), name)

    x_ECD = x_ECD.astype(dtype)
    h_ECF = (ACTIVATIONS[activation](product("mlp_gate", x_ECD, gate_EDF))
             * product("mlp_up", x_ECD, up_EDF))
    return product("mlp_down", h_ECF, down_EFD)


def _scaled(out, scale, dtype):
    return (out.astype(jnp.float32) * scale).astype(dtype)


def _by_ragged_dot(x_RD, sizes_E, weights, activation, dtype):
    gate_EDF, up_EDF, down_EFD = weights
    E = expert_count(gate_EDF)
    # each row's expert, for an int8 weight's scales (rows past the groups take the last's)
    expert_R = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(x_RD.shape[0]),
                                            side="right"), E - 1)

    def product(name, a_RX, w_EXY):
        if not isinstance(w_EXY, Int8Weight):
            return checkpoint_name(jax.lax.ragged_dot(a_RX, w_EXY.astype(dtype), sizes_E), name)
        out_RY = jax.lax.ragged_dot(a_RX, w_EXY.values.astype(dtype), sizes_E)
        return checkpoint_name(_scaled(out_RY, jnp.take(w_EXY.scale, expert_R, axis=0), dtype),
                               name)

    h_RF = (ACTIVATIONS[activation](product("mlp_gate", x_RD, gate_EDF))
            * product("mlp_up", x_RD, up_EDF))
    return product("mlp_down", h_RF, down_EFD)


# The name each block's work carries in the compiled program: how many blocks are used is known
# only when the step runs, so the planner (planning/hlo.py) counts their conditional products
# at the share balanced routing would use.
BLOCKS_SCOPE = "expert_blocks"


def block_rows(rows: int, experts: int) -> int:
    """Rows per block: near the mean group size, a power of two in [8, 256] (fewer padded
    rows for small groups, larger products for large ones)."""
    mean = max(rows // max(experts, 1), 1)
    return min(256, max(8, 2 ** int(math.log2(mean))))


def _by_blocks(x_RD, sizes_E, weights, activation, dtype):
    R, D = x_RD.shape
    E = sizes_E.shape[0]
    b = block_rows(R, E)
    N = -(-R // b) + E  # enough blocks for every group padded to a multiple of b
    padded_E = -(-sizes_E // b) * b
    start_E, padded_start_E = (jnp.cumsum(s) - s for s in (sizes_E, padded_E))
    expert_R = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(R), side="right"),
                           E - 1)
    in_group_R = jnp.arange(R) < jnp.sum(sizes_E)
    # each row's place among the padded groups (past the end: dropped by the scatter)
    place_R = jnp.where(in_group_R,
                        padded_start_E[expert_R] + jnp.arange(R) - start_E[expert_R], N * b)
    x_NbD = jnp.zeros((N * b, D), dtype).at[place_R].set(x_RD, mode="drop").reshape(N, b, D)
    expert_N = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(N) * b,
                                            side="right"), E - 1)
    used = jnp.sum(padded_E) // b
    if any(isinstance(w, Int8Weight) for w in weights):  # not trained: no gradient to shape
        y_NbD = _scan_blocks(activation, dtype, x_NbD, expert_N, used, weights)
    else:
        y_NbD = _blocks_mlp(activation, dtype, x_NbD, expert_N, used, *weights)
    return jnp.take(y_NbD.reshape(N * b, D), jnp.minimum(place_R, N * b - 1), axis=0)


def _block_mlp(activation, dtype, x_bD, gate, up, down):
    """One block of rows through one expert's MLP: (X, Y) weights in `dtype` and their output
    scales (None for float weights) from `_expert_weight`."""
    h_bF = ACTIVATIONS[activation](_product(x_bD, gate, dtype)) * _product(x_bD, up, dtype)
    return _product(h_bF, down, dtype)


def _scan_blocks(activation, dtype, x_NbD, expert_N, used, weights):
    """Each used block through its expert's MLP, the blocks past `used` left zero."""
    @jax.named_scope(BLOCKS_SCOPE)
    def one_block(_, block):
        n, e, x_bD = block
        mlp = lambda: _block_mlp(activation, dtype, x_bD,  # noqa: E731
                                 *(_expert_weight(w, e, dtype) for w in weights))
        return None, jax.lax.cond(n < used, mlp, lambda: jnp.zeros_like(x_bD))

    return jax.lax.scan(one_block, None, (jnp.arange(x_NbD.shape[0]), expert_N, x_NbD))[1]


# Differentiated by hand so that the backward pass keeps only the blocks' inputs and reads each
# expert's weights from the stacks again: left to JAX, every block would save its expert's
# weights (a slice of the stack) for the backward pass, the whole stack many times over.
@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocks_mlp(activation, dtype, x_NbD, expert_N, used, gate, up, down):
    return _scan_blocks(activation, dtype, x_NbD, expert_N, used, (gate, up, down))


def _blocks_mlp_forward(activation, dtype, x_NbD, expert_N, used, gate, up, down):
    y_NbD = _blocks_mlp(activation, dtype, x_NbD, expert_N, used, gate, up, down)
    return y_NbD, (x_NbD, expert_N, used, (gate, up, down))


def _blocks_mlp_backward(activation, dtype, saved, dy_NbD):
    x_NbD, expert_N, used, weights = saved

    @jax.named_scope(BLOCKS_SCOPE)
    def one_block(grads, block):
        n, e, x_bD, dy_bD = block

        def backward():
            rows = lambda x, *w: _block_mlp(activation, dtype, x,  # noqa: E731
                                            *((m, None) for m in w))
            return jax.vjp(rows, x_bD, *(w[e].astype(dtype) for w in weights))[1](dy_bD)

        def bubble():
            return (jnp.zeros_like(x_bD), *(jnp.zeros(w.shape[1:], dtype) for w in weights))

        dx_bD, *dw = jax.lax.cond(n < used, backward, bubble)
        return tuple(g.at[e].add(d.astype(g.dtype)) for g, d in zip(grads, dw)), dx_bD

    # the experts' gradients summed over blocks in float32
    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights)
    grads, dx_NbD = jax.lax.scan(one_block, zeros,
                                 (jnp.arange(x_NbD.shape[0]), expert_N, x_NbD, dy_NbD))
    return (dx_NbD, None, None, *(g.astype(w.dtype) for g, w in zip(grads, weights)))


_blocks_mlp.defvjp(_blocks_mlp_forward, _blocks_mlp_backward)


def _expert_weight(w, e, dtype):
    """Expert e's (X, Y) matrix in `dtype` and its output scales (None for a float weight)."""
    if isinstance(w, Int8Weight):
        return w.values[e].astype(dtype), w.scale[e]
    return w[e].astype(dtype), None


def _product(a_bX, weight, dtype):
    w_XY, scale_Y = weight
    out_bY = a_bX @ w_XY
    return out_bY if scale_Y is None else _scaled(out_bY, scale_Y, dtype)
