"""Qwen3-MoE stacks that mix dense and mixture-of-experts layers (model.decoder_sparse_step,
model.mlp_only_layers) against transformers: which layers are which, logits on one device and
on a mesh, the load-balancing loss over the sparse layers only, greedy generation, the export
and int8; and the stacks and training of our own mixed models."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_on, tiny_config
from hf_models import (TOKENS, WORDS, greedy_texts, hf_logits, hf_qwen3_moe_mixed,
                       objectives_of_both, our_logits)
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.errors import UserError
from pjit_llm.interop import hf as convert
from pjit_llm.models.decoder import layer_runs
from pjit_llm.models.families import abstract_model, family, make_model
from pjit_llm.models.quantize import Int8Weight, quantize_params
from pjit_llm.models.qwen3_moe import hf as qwen3_moe_hf
from test_step import random_rows, run_steps

MIXED = ("model.family=qwen3_moe", "model.num_layers=4", "model.num_experts=4",
         "model.decoder_sparse_step=2", "model.mlp_only_layers=[0]")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(transformers' mixed model, our run directory imported from it)."""
    tmp = tmp_path_factory.mktemp("mixed")
    model = hf_qwen3_moe_mixed(tmp / "hf")
    return model, convert.import_hf(tmp / "hf", tmp / "run")


def test_the_layers_are_dense_or_sparse_as_in_transformers(imported):
    model, run = imported
    cfg = run_config(run).model
    sparse = tuple(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"
                   for layer in model.model.layers)
    assert sparse == (False, True, False, False, False, True)
    assert (cfg.decoder_sparse_step, cfg.mlp_only_layers) == (2, (3,))
    assert cfg.moe_layers() == sparse
    # each kind in its own stack, no layer holding both a dense MLP and experts
    _, abstract = abstract_model(cfg, None)
    assert abstract["blocks"]["mlp"]["router"].shape[0] == 2
    assert "w_gate" not in abstract["blocks"]["mlp"]
    assert abstract["dense_blocks"]["mlp"]["w_gate"].shape == (4, 64, 128)
    assert "router" not in abstract["dense_blocks"]["mlp"]
    assert layer_runs(family("qwen3_moe").model.dense_layers(cfg)) == [
        ("dense_blocks", 0, 1, 0), ("blocks", 0, 1, 1), ("dense_blocks", 1, 4, 2),
        ("blocks", 1, 2, 5)]


@pytest.mark.parametrize("mesh", [None, {"expert": 2, "fsdp": 2, "tensor": 2}],
                         ids=["one device", "expert x fsdp x tensor"])
def test_imported_mixed_models_give_the_logits_of_transformers(imported, mesh):
    model, run = imported
    expected, got = hf_logits(model, TOKENS), our_logits(run, TOKENS, mesh)
    print(f"max |logit difference| {np.abs(got - expected).max():.2e} "
          f"of {np.abs(expected).max():.2f}")
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() < 1e-4


def test_the_load_balancing_loss_pools_the_sparse_layers_only(imported):
    """transformers' aux_loss (its routers' logits: the sparse layers') is our moe_aux_loss,
    and its training loss our objective."""
    model, run = imported
    out, objective, _, metrics = objectives_of_both(model, run, TOKENS)
    assert len(out.router_logits) == 2
    assert abs(float(metrics["moe_aux_loss"]) - float(out.aux_loss)) < 1e-5
    assert abs(objective - float(out.loss)) < 1e-5
    assert float(metrics["expert_tokens_max"]) <= TOKENS.size  # one layer's count, not a sum


def test_mixed_models_generate_what_transformers_generates(imported):
    model, run = imported
    expected, ours = greedy_texts(model, run, 12)
    assert ours == expected
    assert len(expected.split()) == 12 and set(expected.split()) <= set(WORDS)


def test_a_mixed_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    import transformers
    _, run = imported
    out, _ = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=10**9)
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (2, [3])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert np.abs(hf_logits(model.eval(), TOKENS) - our_logits(run, TOKENS)).max() < 1e-4
    ours = run_config(run).model
    assert qwen3_moe_hf.model_config(config, "ours")[0] == ours


def test_int8_dense_layers_keep_their_scales_per_channel_and_the_logits_close():
    cfg = tiny_config(*MIXED)
    parts = build_on(cfg, {"expert": 2, "fsdp": 2, "tensor": 2})
    params = parts.init_state().params
    _, abstract = abstract_model(parts.model, parts.layout)
    q = quantize_params(params, parts.layout, family("qwen3_moe").quantized_weights, abstract)
    gate = q["dense_blocks"]["mlp"]["w_gate"][...]
    assert isinstance(gate, Int8Weight) and gate.scale.shape == (2, parts.model.mlp_dim)
    assert q["blocks"]["mlp"]["expert_gate"][...].scale.shape[:2] == (2, 4)
    tokens = jnp.asarray(random_rows(cfg, n_rows=8)["tokens"])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward = jax.jit(lambda p: nnx.merge(parts.graphdef, p)(tokens, jnp.ones_like(tokens),
                                                             positions).astype(jnp.float32))
    exact, quantized = np.asarray(forward(params)), np.asarray(forward(q))
    assert 0 < np.abs(quantized - exact).max() < 0.02 * np.abs(exact).max()


def test_the_router_statistics_come_from_the_sparse_layers():
    cfg = dataclasses.replace(tiny_config(*MIXED).model, vocab_size=128)
    model = make_model(cfg, None, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
    _, stats = model.hidden_and_stats(tokens, jnp.ones_like(tokens),
                                      jnp.broadcast_to(jnp.arange(16), (2, 16)))
    assert stats["expert_tokens"].shape == (2, 4) and stats["router_z"].shape == (2,)
    np.testing.assert_allclose(stats["expert_tokens"].sum(1), 32 * cfg.experts_per_token)


def test_mixed_stacks_train_unrolled_with_remat_on_a_mesh_as_scanned_on_one_device():
    ref_losses, ref_params = run_steps(tiny_config(*MIXED), None, steps=2)
    assert set(ref_params) >= {"blocks", "dense_blocks"}
    losses, params = run_steps(tiny_config(*MIXED, "model.scan_layers=false", "model.remat=proj"),
                               {"expert": 2, "fsdp": 2, "tensor": 2}, steps=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_without_dense_layers_keeps_its_parameter_tree():
    cfg = tiny_config("model.family=qwen3_moe", "model.num_experts=4").model
    _, abstract = abstract_model(dataclasses.replace(cfg, vocab_size=128), None)
    assert set(abstract) == {"embed", "blocks", "final_norm"}
    assert abstract["blocks"]["mlp"]["router"].shape[0] == cfg.num_layers


@pytest.mark.parametrize("override, message", [
    ("model.decoder_sparse_step=0", r"^model\.decoder_sparse_step=0 must be positive"),
    ("model.mlp_only_layers=[4]", r"^model\.mlp_only_layers=\[4\] names layer 4, not one of "
                                  r"the model\.num_layers=4 layers \(0 to 3\)$"),
    ("model.mlp_only_layers=[1,3]", r"^model\.decoder_sparse_step=2 and model\.mlp_only_layers="
                                    r"\[1, 3\] leave no layer a mixture of experts; use "
                                    r"model\.family=qwen3 for a dense model$"),
])
def test_impossible_layer_kinds_are_refused_in_one_line(override, message):
    with pytest.raises(UserError, match=message):
        tiny_config(*MIXED, override)


def test_config_json_with_no_sparse_layer_is_refused():
    config = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "moe_intermediate_size": 32, "num_experts": 4, "decoder_sparse_step": 3}
    with pytest.raises(UserError, match="leave no layer a mixture of experts"):
        qwen3_moe_hf.model_config(config, "config.json")


def test_pipeline_stages_are_refused_for_a_mixed_stack():
    with pytest.raises(UserError, match=r"^model\.family=qwen3_moe: pipeline stages \(mesh\.stage "
                                        r"> 1\) do not run a stack that mixes dense"):
        build_on(tiny_config(*MIXED), {"stage": 2})


def test_flops_count_the_dense_layers_mlps_and_the_sparse_layers_active_experts():
    cfg = dataclasses.replace(tiny_config(*MIXED).model, vocab_size=384)
    flops = family("qwen3_moe").train_flops_per_token
    D, F, E, k = cfg.embed_dim, cfg.mlp_dim, cfg.num_experts, cfg.experts_per_token
    all_sparse = dataclasses.replace(cfg, decoder_sparse_step=1, mlp_only_layers=())
    # two layers change from the router and k experts to a dense MLP
    assert flops(cfg, 32) - flops(all_sparse, 32) == 6 * 2 * (
        3 * D * F - D * E - k * 3 * D * cfg.expert_size)
