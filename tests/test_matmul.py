"""The one weight multiply: the einsum with the weight cast to the compute dtype, its output
tagged by name so that the `proj` remat policy saves it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjit_llm.models.fp8 import fp8_einsum
from pjit_llm.models.matmul import matmul, matmul_kind


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


def test_under_fp8_the_named_projections_run_in_fp8_and_the_others_do_not():
    x_BD = jax.random.normal(jax.random.key(0), (4, 32), jnp.bfloat16)
    w_DF = jax.random.normal(jax.random.key(1), (32, 16), jnp.float32)
    plain = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_up")
    with matmul_kind("fp8"):
        fp8 = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_up")
        vocab = matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16)  # unnamed: the vocabulary projection
    np.testing.assert_array_equal(np.asarray(fp8, np.float32), np.asarray(
        fp8_einsum("bd,df->bf", x_BD, w_DF, jnp.dtype(jnp.bfloat16)), np.float32))
    assert not np.array_equal(np.asarray(fp8, np.float32), np.asarray(plain, np.float32))
    np.testing.assert_array_equal(np.asarray(vocab, np.float32), np.asarray(plain, np.float32))
    # the context ends with its block
    np.testing.assert_array_equal(np.asarray(matmul("bd,df->bf", x_BD, w_DF, jnp.bfloat16, "mlp_up"),
                                             np.float32), np.asarray(plain, np.float32))


def _saved_residuals(name, capsys, kind="default") -> str:
    """What the backward pass keeps of f(x) = sum(sin(matmul(x, w))) under the policy that
    saves only outputs named "proj" (as model.remat=proj does), as JAX describes it."""
    w = jnp.ones((4, 4))
    policy = jax.checkpoint_policies.save_only_these_names("proj")
    f = jax.checkpoint(lambda x: jnp.sin(matmul("ij,jk->ik", x, w, jnp.float32, name)).sum(),
                       policy=policy)
    with matmul_kind(kind):
        jax.ad_checkpoint.print_saved_residuals(f, jnp.ones((2, 4)))
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["default", "fp8"])
def test_its_name_tags_the_output_for_the_remat_policy(capsys, kind):
    assert "named 'proj'" in _saved_residuals("proj", capsys, kind)  # the product is kept
    untagged = _saved_residuals(None, capsys, kind)
    assert "named" not in untagged and "from the argument x" in untagged  # recomputed from x
