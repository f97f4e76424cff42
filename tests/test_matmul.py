"""The one weight multiply: the einsum with the weight cast to the compute dtype, its output
tagged by name so that the `proj` remat policy saves it; fp8 with current or delayed scales;
an int8 weight multiplies as its dequantized weight would, and an int8 embedding table gives
its dequantized rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjit_llm.models.fp8 import fp8_einsum, fp8_einsum_delayed
from pjit_llm.models.fp8_state import DelayedScales
from pjit_llm.models.matmul import matmul, take_rows
from pjit_llm.models.quantize import Int8Weight, dequantize, quantize


def test_equals_the_einsum_with_the_weight_cast():
    x_BLD = jax.random.normal(jax.random.key(0), (2, 3, 8), jnp.bfloat16)
    w_DF = jax.random.normal(jax.random.key(1), (8, 5), jnp.float32)
    out = matmul("bld,df->blf", x_BLD, w_DF, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 5)
    expected = jnp.einsum("bld,df->blf", x_BLD, w_DF.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    # float32 compute keeps float32 weights exactly
    x32 = x_BLD.astype(jnp.float32)
    np.testing.assert_allclose(matmul("bld,df->blf", x32, w_DF, jnp.float32),
                               np.einsum("bld,df->blf", np.asarray(x32), np.asarray(w_DF)),
                               rtol=1e-5, atol=1e-5)


def test_kind_fp8_multiplies_in_fp8():
    x_BD = jax.random.normal(jax.random.key(0), (4, 32), jnp.bfloat16)
    w_DF = jax.random.normal(jax.random.key(1), (32, 16), jnp.float32)
    plain = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_up")
    fp8 = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_up", kind="fp8")
    np.testing.assert_array_equal(np.asarray(fp8, np.float32), np.asarray(
        fp8_einsum("bd,df->bf", x_BD, w_DF, jnp.dtype(jnp.bfloat16)), np.float32))
    assert not np.array_equal(np.asarray(fp8, np.float32), np.asarray(plain, np.float32))


def test_delayed_scales_multiply_in_fp8_with_the_history_of_the_projection_named():
    x_BD = jax.random.normal(jax.random.key(0), (4, 32), jnp.bfloat16)
    w_DF = jax.random.normal(jax.random.key(1), (32, 16), jnp.float32)
    scales = DelayedScales(("mlp_up", "mlp_gate"), 4)
    scales.mlp_up.set_value(jnp.array([[3.0] * 4, [2.0] * 4, [1.0] * 4]))  # mlp_gate's: empty
    out = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_up", kind=scales)
    expected = fp8_einsum_delayed("bd,df->bf", x_BD, w_DF, scales.mlp_up[...],
                                  jnp.dtype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    other = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_gate", kind=scales)
    assert not np.array_equal(np.asarray(other, np.float32), np.asarray(out, np.float32))


def _saved_residuals(name, capsys, kind="default") -> str:
    """What the backward pass keeps of f(x) = sum(sin(matmul(x, w))) under the policy that
    saves only outputs named "proj" (as model.remat=proj does), as JAX describes it."""
    w = jnp.ones((4, 4))
    policy = jax.checkpoint_policies.save_only_these_names("proj")
    f = jax.checkpoint(lambda x: jnp.sin(matmul("ij,jk->ik", x, w, jnp.float32, name, kind)).sum(),
                       policy=policy)
    jax.ad_checkpoint.print_saved_residuals(f, jnp.ones((2, 4)))
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["default", "fp8"])
def test_its_name_tags_the_output_for_the_remat_policy(capsys, kind):
    assert "named 'proj'" in _saved_residuals("proj", capsys, kind)  # the product is kept
    untagged = _saved_residuals(None, capsys, kind)
    assert "named" not in untagged and "from the argument x" in untagged  # recomputed from x


@pytest.mark.parametrize("equation, w_shape, contracted", [
    ("blhk,hkd->bld", (4, 6, 8), (0, 1)),  # the attention output: scale per output width
    ("bld,dhk->blhk", (8, 4, 6), (0,)),  # a query projection: scale per head and head dim
    ("bld,vd->blv", (12, 8), (1,)),  # the vocabulary projection: scale per token
])
def test_an_int8_weight_multiplies_as_its_dequantized_float_weight(equation, w_shape, contracted):
    w = jax.random.normal(jax.random.key(1), w_shape)
    x = jax.random.normal(jax.random.key(0), (2, 3, *(w_shape[i] for i in contracted)))
    q = quantize(w, contracted)
    expected = jnp.einsum(equation, x, dequantize(q, contracted))
    out = matmul(equation, x, q, jnp.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # and it is not the float weight's product: the quantization is what ran
    assert not np.allclose(out, jnp.einsum(equation, x, w), rtol=1e-6, atol=1e-6)
    assert matmul(equation, x.astype(jnp.bfloat16), q, jnp.bfloat16).dtype == jnp.bfloat16


def test_an_int8_weight_whose_scale_does_not_fit_the_equation_is_refused():
    q = quantize(jnp.ones((8, 5)), (0,))  # scaled per output column
    with pytest.raises(ValueError, match="must span the kept dimensions"):
        matmul("bd,df->bf", jnp.ones((2, 8)), Int8Weight(q.values, q.scale[None]), jnp.float32)


def test_embedding_rows_of_an_int8_table_are_its_dequantized_rows():
    table = jax.random.normal(jax.random.key(2), (12, 8))
    q = quantize(table, (1,))
    tokens = jnp.array([[0, 5, 11], [3, 3, 7]])
    np.testing.assert_allclose(take_rows(q, tokens, jnp.float32),
                               jnp.take(dequantize(q, (1,)), tokens, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(take_rows(table, tokens, jnp.float32), table[tokens])
