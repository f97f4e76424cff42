"""fp8 weight multiplies for training (model.matmul=fp8): float8_e4m3fn operands in the forward
pass, float8_e5m2 output gradients in the backward pass, each tensor scaled on the fly by its
own amax (per-tensor current scaling), products accumulated in float32.

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
    """(x / scale as fp8, scale). Clipping guards the rounding at amax."""
    scale = current_scale(x, fp8_dtype)
    fp8_max = jnp.finfo(fp8_dtype).max.astype(jnp.float32)
    scaled = jnp.clip(x.astype(jnp.float32) / scale, -fp8_max, fp8_max)
    return scaled.astype(fp8_dtype), scale


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
