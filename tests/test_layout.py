"""Logical axes to shardings: parameters and optimizer moments carry exactly the shardings the
rule table implies, activation specs use each mesh axis once."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import build_on
from pjit_llm.errors import UserError
from pjit_llm.models.families import abstract_model
from pjit_llm.parallel.layout import Layout, attention_kv_heads, fit_kv_heads, param_shardings
from pjit_llm.parallel.mesh import make_mesh

# Expected specs written out by hand from the default rules: batch->(data, stage, fsdp),
# embed->fsdp, heads/kv_heads/mlp/vocab->tensor, layers->stage (size 1 here), head_dim->none.
# With both fsdp and tensor, data parallelism on top changes no parameter's spec.
SHARDED = {
    "embed": P("tensor", "fsdp"), "blocks.attn.wq": P(None, "fsdp", "tensor", None),
    "blocks.attn.wk": P(None, "fsdp", "tensor", None),
    "blocks.attn.wo": P(None, "tensor", None, "fsdp"),
    "blocks.mlp.w_up": P(None, "fsdp", "tensor"), "blocks.mlp.w_down": P(None, "tensor", "fsdp"),
    "blocks.attn_norm.scale": P(None, "fsdp"), "final_norm.scale": P("fsdp")}
EXPECTED = {
    "dp (8,1,1)": ((8, 1, 1), {
        "embed": P(None, None), "blocks.attn.wq": P(None, None, None, None),
        "blocks.attn.wk": P(None, None, None, None), "blocks.attn.wo": P(None, None, None, None),
        "blocks.mlp.w_up": P(None, None, None), "blocks.mlp.w_down": P(None, None, None),
        "blocks.attn_norm.scale": P(None, None), "final_norm.scale": P(None)}),
    "fsdp (1,8,1)": ((1, 8, 1), {
        "embed": P(None, "fsdp"), "blocks.attn.wq": P(None, "fsdp", None, None),
        "blocks.attn.wk": P(None, "fsdp", None, None), "blocks.attn.wo": P(None, None, None, "fsdp"),
        "blocks.mlp.w_up": P(None, "fsdp", None), "blocks.mlp.w_down": P(None, None, "fsdp"),
        "blocks.attn_norm.scale": P(None, "fsdp"), "final_norm.scale": P("fsdp")}),
    "tensor (1,2,4)": ((1, 2, 4), SHARDED),
    "hybrid (2,2,2)": ((2, 2, 2), SHARDED),
}


def _by_name(tree) -> dict:
    """Leaves by dotted path, without the `.value` of the nnx.Variable that holds them."""
    return {jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _build(cfg):
    parts = build_on(cfg, cfg.mesh.sizes())
    return parts.layout, parts.init_state()


@pytest.mark.parametrize("name", EXPECTED)
def test_params_and_moments_follow_the_rules(tiny, name):
    (d, f, t), expected = EXPECTED[name]
    cfg = tiny(f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}")
    layout, state = _build(cfg)
    params = _by_name(state.params)
    for param_name, spec in expected.items():
        array = params[param_name]
        assert array.sharding.spec == spec, param_name
        # The shards really are cut: each device holds shape / (mesh size along each dim).
        local = array.addressable_shards[0].data.shape
        cut = tuple(1 if s is None else layout.mesh.shape[s] for s in spec)
        assert local == tuple(n // c for n, c in zip(array.shape, cut)), param_name
    assert set(params) == {"embed", "final_norm.scale", *(k for k in params if k.startswith("blocks."))}
    # Adam's two moments (mu, nu) are laid out exactly like the parameter they follow.
    moments = _by_name(state.opt_state)
    for param_name, array in params.items():
        specs = [m.sharding.spec for k, m in moments.items() if k.endswith("." + param_name)]
        assert specs == [array.sharding.spec] * 2, param_name
    assert state.step.sharding.spec == P()


def test_untied_output_projection_is_vocab_parallel(tiny):
    layout, state = _build(tiny("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                "model.tie_embeddings=false"))
    assert _by_name(state.params)["unembed"].sharding.spec == P("fsdp", "tensor")


def test_changing_strategy_is_a_config_edit(tiny):
    # Megatron-style: no FSDP, shard the MLP over (fsdp, tensor) together.
    layout, state = _build(tiny("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4",
                                "mesh.rules.embed=null", "mesh.rules.mlp=[fsdp, tensor]"))
    params = _by_name(state.params)
    assert params["blocks.mlp.w_up"].sharding.spec == P(None, None, ("fsdp", "tensor"))
    assert params["blocks.attn.wq"].sharding.spec == P(None, None, "tensor", None)


def test_activation_specs_skip_a_mesh_axis_already_used(tiny):
    cfg = tiny("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    layout = build_on(cfg, cfg.mesh.sizes()).layout
    assert layout.spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert layout.spec(("batch", "length", "heads", "head_dim")) == P(("data", "fsdp"), None, "tensor", None)
    assert layout.spec(("embed", "mlp")) == P("fsdp", "tensor")


@pytest.mark.parametrize("kv_heads, tensor, repeated", [(4, 2, 4), (4, 8, 8), (2, 8, 8), (1, 4, 4)])
def test_fewer_kv_heads_than_tensor_shards_are_kept_whole_and_repeated(tiny, kv_heads, tensor,
                                                                       repeated):
    cfg = tiny(f"model.num_kv_heads={kv_heads}", "mesh.data=1", f"mesh.tensor={tensor}")
    mesh = make_mesh(cfg.mesh, jax.devices()[:tensor])
    layout = fit_kv_heads(Layout(mesh, cfg.mesh.rules), 8, kv_heads)
    assert attention_kv_heads(layout, 8, kv_heads) == repeated
    wk = P(None, None, "tensor" if repeated == kv_heads else None, None)  # else whole on each shard
    shardings = param_shardings(layout, abstract_model(cfg.model, layout)[1])
    assert shardings["blocks"]["attn"]["wk"].get_value().spec == wk


def test_query_heads_that_do_not_split_over_tensor_are_refused_in_one_line(tiny):
    with pytest.raises(UserError) as e:
        build_on(tiny("model.num_heads=4", "model.num_kv_heads=2"), tensor=8)
    assert str(e.value) == ("model.num_heads=4 query heads (model.num_kv_heads=2) do not split over "
                            "mesh axes tensor=8; use a tensor size that divides 4 (key/value heads "
                            "are repeated across the shards when there are fewer)")
