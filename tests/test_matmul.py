"""The one weight multiply: the einsum with the weight cast to the compute dtype, its output
tagged by name so that the `proj` remat policy saves it."""

import jax
import jax.numpy as jnp
import numpy as np

from pjit_llm.models.matmul import matmul


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


def _saved_residuals(name, capsys) -> str:
    """What the backward pass keeps of f(x) = sum(sin(matmul(x, w))) under the policy that
    saves only outputs named "proj" (as model.remat=proj does), as JAX describes it."""
    w = jnp.ones((4, 4))
    policy = jax.checkpoint_policies.save_only_these_names("proj")
    f = jax.checkpoint(lambda x: jnp.sin(matmul("ij,jk->ik", x, w, jnp.float32, name)).sum(),
                       policy=policy)
    jax.ad_checkpoint.print_saved_residuals(f, jnp.ones((2, 4)))
    return capsys.readouterr().out


def test_its_name_tags_the_output_for_the_remat_policy(capsys):
    assert "named 'proj'" in _saved_residuals("proj", capsys)  # the product is kept
    untagged = _saved_residuals(None, capsys)
    assert "named" not in untagged and "from the argument x" in untagged  # recomputed from x
