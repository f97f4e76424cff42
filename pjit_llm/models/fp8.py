"""fp8 weight multiplies for training (model.matmul=fp8): float8_e4m3fn operands in the forward
pass, float8_e5m2 output gradients in the backward pass, each tensor scaled per tensor,
products accumulated in float32. Two ways to choose the scales (model.fp8_scaling):
- current (`fp8_einsum`): each tensor's own amax, taken on the fly right before quantizing it
  (a pass over the tensor that the quantization has to wait for);
- delayed (`fp8_einsum_delayed`): the largest amax in a history of the tensor's amaxes from
  earlier steps, as Transformer Engine and Flax do. The tensor is quantized at once with that
  scale (values beyond the stale amax saturate) and its own amax, taken in the same pass,
  comes back as the "gradient" of the history: the history with it pushed in, newest first.

Every operand goes through quantize -> dequantize (divide by the scale, clip, convert to fp8;
convert back, multiply by the scale) right before a dot with preferred_element_type=float32.
On H100s XLA's GEMM rewriter folds exactly that pattern into a cuBLASLt fp8 GEMM with the scales
as arguments; elsewhere (CPUs) the same program runs the dot on fp8-rounded values in the
compute dtype, so the numerics are those of fp8 everywhere.
"""

from functools import partial

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn  # activations and weights: more mantissa (3 bits)
GRADIENT_DTYPE = jnp.float8_e5m2  # output gradients: more range (5 exponent bits)


def current_scale(x: jax.Array, fp8_dtype) -> jax.Array:
    """amax(|x|) / the fp8 type's largest value, in float32; 1 for an all-zero tensor."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    fp8_max = jnp.float32(jnp.finfo(fp8_dtype).max)
    return jnp.where(amax > 0, amax / fp8_max, jnp.float32(1.0))


def quantize(x: jax.Array, fp8_dtype) -> tuple[jax.Array, jax.Array]:
    """(x / scale as fp8, scale) with x's own scale."""
    scale = current_scale(x, fp8_dtype)
    return quantize_with(x, scale, fp8_dtype), scale


def quantize_with(x: jax.Array, scale: jax.Array, fp8_dtype) -> jax.Array:
    """x / scale as fp8. Clipping guards the rounding at amax (and, with a scale from earlier
    steps, saturates values beyond it)."""
    fp8_max = jnp.finfo(fp8_dtype).max.astype(jnp.float32)
    return jnp.clip(x.astype(jnp.float32) / scale, -fp8_max, fp8_max).astype(fp8_dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return q.astype(dtype) * scale.astype(dtype)


def _transposed_equations(equation: str) -> tuple[str, str]:
    """For "x,w->out": the einsums giving d/dx ("out,w->x") and d/dw ("x,out->w"). Each
    operand index must appear in the other operand or the output (true of every matmul)."""
    inputs, out = equation.replace(" ", "").split("->")
    x, w = inputs.split(",")
    if any(i not in w + out for i in x) or any(i not in x + out for i in w):
        raise ValueError(f"fp8 matmul cannot transpose {equation!r}: an operand index is "
                         "summed over that operand alone")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


def _dot(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def fp8_einsum(equation: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """`einsum(equation, x, w)` with e4m3 operands, float32 accumulation, output in `dtype`;
    its gradients use the e5m2 output gradient and the forward pass's e4m3 operands."""
    return _fp8_einsum_fwd(equation, x, w, dtype)[0]


def _fp8_einsum_fwd(equation, x, w, dtype):
    _transposed_equations(equation)  # refuse an equation the backward pass cannot transpose
    x_q, x_scale = quantize(x, FORWARD_DTYPE)
    w_q, w_scale = quantize(w, FORWARD_DTYPE)
    out = _dot(equation, dequantize(x_q, x_scale, dtype), dequantize(w_q, w_scale, dtype))
    # The backward pass keeps the fp8 operands (a quarter of float32's bytes) and, as empty
    # arrays, the dtypes the gradients come back in (residuals must be arrays).
    like = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return out.astype(dtype), (x_q, x_scale, w_q, w_scale, like)


def _fp8_einsum_bwd(equation, dtype, residuals, g_out):
    x_q, x_scale, w_q, w_scale, (x_like, w_like) = residuals
    dx_equation, dw_equation = _transposed_equations(equation)
    g_q, g_scale = quantize(g_out, GRADIENT_DTYPE)
    g = dequantize(g_q, g_scale, dtype)
    dx = _dot(dx_equation, g, dequantize(w_q, w_scale, dtype))
    dw = _dot(dw_equation, dequantize(x_q, x_scale, dtype), g)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


fp8_einsum.defvjp(_fp8_einsum_fwd, _fp8_einsum_bwd)


# -- delayed scaling -------------------------------------------------------------------------

# A projection's amax history is one (3, H) float32 array: a row per operand, newest first.
INPUT, WEIGHT, GRADIENT = 0, 1, 2


def amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def history_scale(history_H: jax.Array, fp8_dtype) -> jax.Array:
    """The scale for the largest amax of the history; 1 for an empty (all-zero) history."""
    largest = jnp.max(history_H)
    return jnp.where(largest > 0, largest / jnp.finfo(fp8_dtype).max.astype(jnp.float32),
                     jnp.float32(1.0))


def pushed(history_H: jax.Array, new_amax: jax.Array) -> jax.Array:
    """The history with `new_amax` first and its oldest entry dropped."""
    return jnp.concatenate([new_amax[None].astype(history_H.dtype), history_H[:-1]])


@partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def fp8_einsum_delayed(equation: str, x: jax.Array, w: jax.Array, history_3H: jax.Array,
                       dtype) -> jax.Array:
    """`fp8_einsum` with the scales of `history_3H` (rows INPUT, WEIGHT, GRADIENT).
    Differentiated, the history's "gradient" is its next value: each row with this step's
    amax of its operand pushed in (the caller overwrites the history with it)."""
    return _fp8_delayed_fwd(equation, x, w, history_3H, dtype)[0]


def _fp8_delayed_fwd(equation, x, w, history_3H, dtype):
    _transposed_equations(equation)
    x_scale = history_scale(history_3H[INPUT], FORWARD_DTYPE)
    w_scale = history_scale(history_3H[WEIGHT], FORWARD_DTYPE)
    x_q, w_q = quantize_with(x, x_scale, FORWARD_DTYPE), quantize_with(w, w_scale, FORWARD_DTYPE)
    out = _dot(equation, dequantize(x_q, x_scale, dtype), dequantize(w_q, w_scale, dtype))
    like = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    seen = (amax(x), amax(w))  # read in the quantizing pass; nothing waits on them
    return out.astype(dtype), (x_q, x_scale, w_q, w_scale, history_3H, seen, like)


def _fp8_delayed_bwd(equation, dtype, residuals, g_out):
    x_q, x_scale, w_q, w_scale, history_3H, (x_amax, w_amax), (x_like, w_like) = residuals
    dx_equation, dw_equation = _transposed_equations(equation)
    g_scale = history_scale(history_3H[GRADIENT], GRADIENT_DTYPE)
    g = dequantize(quantize_with(g_out, g_scale, GRADIENT_DTYPE), g_scale, dtype)
    dx = _dot(dx_equation, g, dequantize(w_q, w_scale, dtype))
    dw = _dot(dw_equation, dequantize(x_q, x_scale, dtype), g)
    following = jnp.stack([pushed(history_3H[INPUT], x_amax), pushed(history_3H[WEIGHT], w_amax),
                           pushed(history_3H[GRADIENT], amax(g_out))])
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype), following


fp8_einsum_delayed.defvjp(_fp8_delayed_fwd, _fp8_delayed_bwd)
