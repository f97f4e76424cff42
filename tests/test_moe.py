"""Mixtures of experts (models/moe.py; families mixtral and qwen3_moe) against transformers:
logits of imported random models on one device and on meshes, the load-balancing loss and the
whole training objective, greedy generation, exports transformers loads, both spellings of
config.json; the grouped products drop no token however unbalanced the routing; training on
a mesh equals one device and logs the router's metrics; through pipeline stages (GPipe and
circular) the logits, the router's statistics, losses and gradients, and training are one
device's."""

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import build_on, tiny_config
from hf_models import (TOKENS, WORDS, greedy_texts, hf_logits, hf_mixtral, hf_qwen3_moe,
                       objectives_of_both,
                       our_logits)
from pjit_llm.checkpoint.exports import write_export
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.config import load_config
from pjit_llm.errors import UserError
from pjit_llm.interop import hf as convert
from pjit_llm.models.expert_dispatch import expert_outputs
from pjit_llm.models.expert_products import grouped_mlp
from pjit_llm.models.families import abstract_model, family, make_model
from pjit_llm.models.layers import ACTIVATIONS
from pjit_llm.models.loss import objective_terms
from pjit_llm.models.mixtral import hf as mixtral_hf
from pjit_llm.models.moe import route
from pjit_llm.models.quantize import Int8Weight, quantize_params
from pjit_llm.models.qwen3_moe import hf as qwen3_moe_hf
from pjit_llm.parallel.stages import Pipeline
from pjit_llm.training.measure import step_memory
from test_step import random_rows, run_steps

MAKERS = {"mixtral": hf_mixtral, "qwen3_moe": hf_qwen3_moe}
MAPPINGS = {"mixtral": mixtral_hf, "qwen3_moe": qwen3_moe_hf}


@pytest.fixture(scope="module", params=list(MAKERS))
def imported(request, tmp_path_factory):
    """(family, transformers' model, our run directory imported from it)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = MAKERS[request.param](tmp / "hf")
    return request.param, model, convert.import_hf(tmp / "hf", tmp / "run")


def test_config_json_gives_the_experts(imported):
    name, _, run = imported
    cfg = run_config(run).model
    assert cfg.family == name
    expected = {"mixtral": (4, 2, 96, True, 0.02), "qwen3_moe": (8, 3, 48, False, 0.01)}[name]
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_size, cfg.norm_topk_prob,
            cfg.router_aux_loss_coef) == expected


# Eight rows, so that each of up to four batch shards routes its own (and sends them to the
# experts' devices), also in each of two pipeline micro-batches.
ROWS = np.random.default_rng(1).integers(0, 300, (8, 48)).astype(np.int32)


@pytest.mark.parametrize("mesh", [None, {"expert": 2}, {"expert": 4, "tensor": 2}],
                         ids=["one device", "expert", "expert x tensor"])
def test_imported_models_give_the_logits_of_transformers(imported, mesh):
    _, model, run = imported
    expected, got = hf_logits(model, ROWS), our_logits(run, ROWS, mesh)
    print(f"max |logit difference| {np.abs(got - expected).max():.2e} of {np.abs(expected).max():.2f}")
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() < 1e-4


def test_the_objective_is_transformers_loss_with_its_load_balancing_term(imported):
    """transformers' aux_loss (output_router_logits) is our moe_aux_loss for the same batch,
    and its training loss (cross-entropy + router_aux_loss_coef x aux_loss) our objective."""
    _, model, run = imported
    out, objective, cross_entropy, metrics = objectives_of_both(model, run, TOKENS)
    assert abs(float(metrics["moe_aux_loss"]) - float(out.aux_loss)) < 1e-5
    assert float(metrics["moe_aux_loss"]) > 1.0  # about 1 when balanced: it is not zero
    assert abs(objective - float(out.loss)) < 1e-5
    assert objective - cross_entropy > 0


def test_they_generate_what_transformers_generates(imported):
    _, model, run = imported
    expected, ours = greedy_texts(model, run, 12)
    assert ours == expected
    assert len(expected.split()) == 12 and set(expected.split()) <= set(WORDS)


@pytest.mark.parametrize("imported", ["qwen3_moe"], indirect=True)  # one family: shared experts
def test_an_int8_export_generates(imported, tmp_path):
    """The experts quantized to int8 (with the attention) reach generation's decode loop."""
    from pjit_llm.inference.generator import Sampling, generate_texts
    _, _, run = imported
    parts = build_on(run_config(run))
    out, _ = write_export(run_config(run), parts.layout, tmp_path / "int8", None, "float32", "int8")
    assert run_config(out).model.quantize == "int8"
    exact, = generate_texts(run, ["the cat sat on"], 8, Sampling())
    quantized, = generate_texts(out, ["the cat sat on"], 8, Sampling())
    assert len(quantized.split()) == 8 and set(quantized.split()) <= set(WORDS)
    print(f"greedy: {exact!r}; int8: {quantized!r}")


def test_an_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    import transformers
    name, _, run = imported
    out, _ = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=10**9)
    assert json.loads((out / "config.json").read_text())["model_type"] == name
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}[name] + "ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert np.abs(hf_logits(model.eval(), TOKENS) - our_logits(run, TOKENS)).max() < 1e-4


def test_both_spellings_of_config_json_read_alike(imported):
    name, model, _ = imported
    mapping = MAPPINGS[name]
    v5 = model.config.to_dict()  # transformers 5: rope_parameters, num_local_experts
    ours, _ = mapping.model_config(v5, "v5")
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "num_local_experts")}
    v4.update(rope_theta=v5["rope_parameters"]["rope_theta"], torch_dtype="float32")
    v4["num_experts" if name == "qwen3_moe" else "num_local_experts"] = ours.num_experts
    assert mapping.model_config(v4, "v4")[0] == ours
    assert mapping.model_config(mapping.hf_config(ours, "float32"), "ours")[0] == ours


@pytest.mark.parametrize("mapping, change, message", [
    (mixtral_hf, {"sliding_window": 4096}, "sliding-window attention"),
    (mixtral_hf, {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
    (mixtral_hf, {"num_local_experts": 2, "num_experts_per_tok": 3}, "experts_per_token=3 exceeds"),
])
def test_configs_it_does_not_compute_are_refused(mapping, change, message):
    config = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "moe_intermediate_size": 32, "num_local_experts": 4, **change}
    with pytest.raises(UserError, match=message):
        mapping.model_config(config, "config.json")


def dense_reference(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD):
    """Each token through each of its experts one by one, in numpy."""
    out = np.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for e, w in zip(experts_TK[t], weights_TK[t]):
            h = np.asarray(jax.nn.silu(x_TD[t] @ gate_EDF[e])) * (x_TD[t] @ up_EDF[e])
            out[t] += w * (h @ down_EFD[e])
    return out


def unbalanced(T=40, D=16, E=8, F=24, k=2):
    """A router that sends every token to experts 0 and 1 (of 8), and random experts:
    (x, experts chosen, routing weights, (gate, up, down))."""
    rng = np.random.default_rng(0)
    x_TD = rng.standard_normal((T, D)).astype(np.float32)
    x_TD[:, 0] = 5.0
    router_DE = rng.standard_normal((D, E)).astype(np.float32) * 0.1
    router_DE[0, :2] = 10.0  # experts 0 and 1 win everywhere
    gate, up = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    _, _, weights_TK, experts_TK = route(jnp.asarray(x_TD), jnp.asarray(router_DE), k, True)
    assert set(np.asarray(experts_TK).ravel()) == {0, 1}
    return jnp.asarray(x_TD), experts_TK, weights_TK, tuple(map(jnp.asarray, (gate, up, down)))


def moe_config(**changes):
    model = tiny_config("model.family=mixtral", "model.num_experts=8").model
    return dataclasses.replace(model, dtype=jnp.float32, **changes)


@pytest.mark.parametrize("matmul", ["blocks", "ragged_dot"])
def test_no_token_is_dropped_however_unbalanced_the_routing(matmul):
    """With a capacity of 1.25 x the even share, three quarters of experts 0 and 1's
    assignments would be dropped; dropless, every token's two contributions are present
    (each grouped product against one expert at a time in numpy), and counted."""
    x_TD, experts_TK, weights_TK, (gate, up, down) = unbalanced()
    T, k, E, F, D = *experts_TK.shape, *gate.shape[:1], gate.shape[2], x_TD.shape[1]
    cfg = moe_config(expert_matmul=matmul)
    got, served_T = expert_outputs(x_TD, experts_TK, weights_TK, (gate, up, down), cfg, ())
    expected = dense_reference(np.asarray(x_TD), np.asarray(experts_TK), np.asarray(weights_TK),
                               *map(np.asarray, (gate, up, down)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(served_T) == k)
    # Counting: with unit routing weights, inputs and gate/up weights, and each expert's down
    # projection writing only coordinate e, a token's output holds one unit
    # (F x silu(D) x D) at each of its k experts' coordinates.
    onehot_down = np.zeros((E, F, D), np.float32)
    for e in range(E):
        onehot_down[e, :, e] = 1.0
    ones = np.ones((E, D, F), np.float32)
    counted, _ = expert_outputs(jnp.ones((T, D)), experts_TK, jnp.ones((T, k)),
                                tuple(map(jnp.asarray, (ones, ones, onehot_down))), cfg, ())
    per_expert = np.asarray(counted)[:, :E] / (F * float(ACTIVATIONS["silu"](D * 1.0)) * D)
    np.testing.assert_allclose(per_expert.sum(1), k, rtol=1e-5)
    np.testing.assert_allclose(per_expert, np.asarray(jax.nn.one_hot(experts_TK, E).sum(1)), atol=1e-5)


def test_the_grouped_products_by_blocks_differentiate_as_ragged_dot():
    """The blocks' hand-written backward pass (re-reading each expert's weights) gives the
    gradients of jax.lax.ragged_dot's, an empty group and rows past the groups included."""
    rng = np.random.default_rng(0)
    R, D, E, F = 50, 16, 4, 24
    x_RD = jnp.asarray(rng.standard_normal((R, D)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
               for s in ((E, D, F), (E, D, F), (E, F, D))]
    sizes_E = jnp.array([10, 0, 25, 5], jnp.int32)

    def gradients(matmul):
        loss = lambda x, *w: jnp.sum(jnp.sin(grouped_mlp(x, sizes_E, *w, "silu", jnp.float32,  # noqa: E731
                                                          matmul)))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x_RD, *weights)

    by_blocks, by_ragged_dot = gradients("blocks"), gradients("ragged_dot")
    assert np.abs(np.asarray(by_blocks[0][40:])).max() == 0  # rows past the groups
    for a, b in zip(by_blocks, by_ragged_dot):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_capacity_mode_drops_what_exceeds_the_capacity_and_says_so():
    """factor 1.25: each expert takes ceil(1.25 x 40 x 2 / 8) = 13 assignments, first choices
    (in token order) before second ones; experts 0 and 1 get all 80, so 54 are dropped and
    each token keeps exactly the contributions of its kept assignments."""
    x_TD, experts_TK, weights_TK, weights = unbalanced()
    got, served_T = expert_outputs(x_TD, experts_TK, weights_TK, weights,
                                   moe_config(expert_capacity_factor=1.25), ())
    experts, routing = np.asarray(experts_TK), np.asarray(weights_TK)
    taken, kept = {}, np.zeros(experts.shape, bool)
    for j in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = experts[t, j]
            kept[t, j] = taken.get(e, 0) < 13
            taken[e] = taken.get(e, 0) + 1
    assert kept.sum() == 26
    np.testing.assert_array_equal(np.asarray(served_T), kept.sum(1))
    expected = dense_reference(np.asarray(x_TD), experts, routing * kept, *map(np.asarray, weights))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [0.0, 100.0], ids=["dropless", "capacity"])
def test_tokens_sent_to_the_experts_devices_come_back_as_on_one_device(factor):
    """The experts split four ways (mesh.expert=4, each device holding two), the tokens
    split four ways: gathered and reduce-scattered (dropless) or exchanged all-to-all
    (capacity), each token's output is one device's."""
    x_TD, experts_TK, weights_TK, weights = unbalanced(T=64)
    cfg = moe_config(expert_capacity_factor=factor)
    expected, _ = expert_outputs(x_TD, experts_TK, weights_TK, weights, cfg, ())
    mesh = jax.make_mesh((4,), ("expert",))
    split = jax.jit(jax.shard_map(lambda *a: expert_outputs(*a, cfg, ("expert",)), mesh=mesh,
                                  in_specs=(P("expert"),) * 3 + (P("expert"),),
                                  out_specs=P("expert")))
    split_rows = jax.sharding.NamedSharding(mesh, P("expert"))
    got, served_T = split(*jax.device_put((x_TD, experts_TK, weights_TK, weights), split_rows))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(served_T) == 2)


def test_each_batch_shard_sorts_only_its_own_tokens():
    """On data=4, each device routes its quarter of the batch: the sort of assignments runs
    over (B / 4) x L x k of them, not over the global batch's (which would gather every
    token to every device and compute all of them there)."""
    parts = build_on(tiny_config("model.family=mixtral", "model.num_experts=4"), {"data": 4})
    B, L, k = 8, 32, parts.model.experts_per_token
    tokens = jnp.zeros((B, L), jnp.int32)
    forward = jax.jit(lambda p, t: nnx.merge(parts.graphdef, p)(t, jnp.ones_like(t), t))
    text = forward.lower(parts.init_state().params, tokens).as_text()
    sorted_sizes = re.findall(r"call @argsort\w*\(%\w+\) : \(tensor<(\d+)xi32>", text)
    assert sorted_sizes and set(sorted_sizes) == {str(B // 4 * L * k)}


def test_the_router_statistics_count_every_real_token_in_every_layer():
    cfg = dataclasses.replace(tiny_config("model.family=mixtral").model, vocab_size=128,
                              num_experts=4, experts_per_token=2)
    model = make_model(cfg, None, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 12 + [0] * 4], 2, 0), jnp.int32)  # 8 padding
    _, stats = model.hidden_and_stats(tokens, segments, jnp.broadcast_to(jnp.arange(16), (2, 16)))
    assert stats["expert_tokens"].shape == (cfg.num_layers, 4)
    np.testing.assert_allclose(stats["expert_tokens"].sum(1), 24 * 2)
    np.testing.assert_allclose(stats["router_probs"].sum(1), 24, rtol=1e-5)


TRAINED = ("model.family=mixtral", "model.num_experts=4", "model.router_z_loss_coef=0.001")


@pytest.fixture(scope="module")
def trained_on_one_device():
    return run_steps(tiny_config(*TRAINED), None)


@pytest.mark.parametrize("mesh", [{"expert": 2}, {"expert": 4, "tensor": 2}],
                         ids=["expert", "expert x tensor"])
def test_moe_trains_on_a_mesh_as_on_one_device(trained_on_one_device, mesh):
    """Three steps (the router's losses and the experts' gradients included; with `expert`,
    tokens exchanged with the experts' devices) equal one device's."""
    ref_losses, ref_params = trained_on_one_device
    assert ref_losses[-1] < ref_losses[0]
    losses, params = run_steps(tiny_config(*TRAINED), mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unrolled_layers_and_remat_give_the_scanned_result():
    cfg = tiny_config("model.family=mixtral", "model.num_experts=4")
    ref_losses, ref_params = run_steps(cfg, None, steps=2)
    losses, params = run_steps(tiny_config("model.family=mixtral", "model.num_experts=4",
                                           "model.scan_layers=false", "model.remat=proj"),
                               {"data": 2}, steps=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_experts_train():
    losses, _ = run_steps(tiny_config("model.family=qwen3_moe", "model.num_experts=4",
                                      "model.dtype=bfloat16", "model.param_dtype=bfloat16"),
                          {"expert": 2, "fsdp": 2}, steps=3)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_experts_shard_over_the_expert_axis_and_stay_there():
    """mesh.expert splits the stacked experts (parameters and optimizer moments) and, like
    data, the batch rows. The step moves tokens to the experts, not experts to the tokens: no
    collective of the compiled step gathers a whole expert stack (E experts) onto a device."""
    cfg = tiny_config("model.family=mixtral", "model.num_experts=4")
    parts = build_on(cfg, {"expert": 2, "fsdp": 2, "tensor": 2})
    state = parts.init_state()
    gate = state.params["blocks"]["mlp"]["expert_gate"][...]
    assert gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
    L, E, D, F = gate.shape
    assert {s.data.shape for s in gate.addressable_shards} == {(L, E // 2, D // 2, F // 2)}
    moments = [m for m in jax.tree.leaves(state.opt_state) if getattr(m, "shape", ()) == gate.shape]
    assert moments and all(m.sharding.spec == gate.sharding.spec for m in moments)
    assert parts.batch_sharding.spec == P(("fsdp", "expert"), None)
    batch = {k: jax.device_put(v, parts.batch_sharding)
             for k, v in random_rows(cfg, n_rows=cfg.data.batch_size).items()}
    hlo = parts.train_step.lower(state, batch).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather\(", hlo)
    assert gathered  # FSDP still gathers each expert's rows
    d, f = f"({D}|{D // 2})", f"({F}|{F // 2})"
    stacks = [g for g in gathered if re.fullmatch(rf"({L},)?{E},({d},{f}|{f},{d})", g)]
    assert not stacks, stacks
    assert re.search(r"reduce-scatter\(", hlo)  # the experts' outputs back to their tokens


def test_experts_the_expert_axis_does_not_divide_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"^parameter blocks\.mlp\.expert_\w+ dimension 1 "
                                        r"\(expert=6\) is not divisible by mesh axes expert=4; "
                                        r"change the model size, the mesh, or mesh\.rules\.expert$"):
        build_on(tiny_config("model.family=mixtral", "model.num_experts=6"), {"expert": 4})


def test_accumulated_micro_batches_log_their_token_weighted_router_metrics():
    """With train.grad_accum=2 each micro-batch (rows j, j+2, ...) has its own router losses;
    the step logs their means weighted by the micro-batches' predicted tokens."""
    cfg = tiny_config("model.family=mixtral", "model.num_experts=4", "train.grad_accum=2",
                      "model.router_z_loss_coef=0.001")
    parts = build_on(cfg, {"data": 2, "tensor": 2})
    rows = random_rows(cfg, n_rows=cfg.data.batch_size)
    rows["segment_ids"][0, 10:] = 0  # the micro-batches predict different numbers of tokens
    state = parts.init_state()
    params = jax.device_get(state.params)
    batch = {k: jax.device_put(v, parts.batch_sharding) for k, v in rows.items()}
    _, metrics = parts.train_step(state, batch)
    terms = jax.jit(lambda p, b: objective_terms(parts.graphdef, p, b))
    micro = [terms(params, {k: jnp.asarray(v[j::2]) for k, v in rows.items()})[1]
             for j in range(2)]
    counts = [float(c) for c, _, _ in micro]
    assert counts[0] != counts[1]
    for name in ("moe_aux_loss", "router_z_loss", "expert_tokens_max"):
        expected = sum(c * float(m[name]) for c, (_, _, m) in zip(counts, micro)) / sum(counts)
        assert abs(float(metrics[name]) - expected) < 1e-4 * abs(expected), name
    assert abs(float(metrics["loss"]) - sum(float(l) for _, l, _ in micro) / sum(counts)) < 1e-5


def test_the_step_logs_the_router_metrics():
    """With capacity for half the even share, at least half the assignments are dropped (the
    tokens exchanged over mesh.expert), and the step says so (dropless runs log 0: see
    e2e/test_train_cli.py)."""
    cfg = tiny_config("model.family=qwen3_moe", "model.num_experts=4", "model.experts_per_token=2",
                      "model.expert_capacity_factor=0.5")
    parts = build_on(cfg, {"data": 2, "expert": 2})
    rows = random_rows(cfg, n_rows=cfg.data.batch_size)
    batch = {k: jax.device_put(v, parts.batch_sharding) for k, v in rows.items()}
    _, metrics = parts.train_step(parts.init_state(), batch)
    tokens = float(np.sum(rows["segment_ids"] > 0))
    assert float(metrics["expert_tokens_mean"]) == tokens * 2 / 4
    assert tokens * 2 / 4 <= float(metrics["expert_tokens_max"]) <= tokens
    assert float(metrics["moe_aux_loss"]) >= 1.0 - 1e-5  # its minimum: perfectly balanced
    assert float(metrics["router_z_loss"]) > 0
    assert 0.45 <= float(metrics["expert_dropped_share"]) < 1.0


def test_int8_experts_keep_their_scales_per_expert_and_the_logits_close():
    cfg = tiny_config("model.family=qwen3_moe", "model.num_experts=4")
    parts = build_on(cfg, {"fsdp": 2, "tensor": 2})
    params = parts.init_state().params
    _, abstract = abstract_model(parts.model, parts.layout)
    q = quantize_params(params, parts.layout, family("qwen3_moe").quantized_weights, abstract)
    gate, down = (q["blocks"]["mlp"][n][...] for n in ("expert_gate", "expert_down"))
    L, E, F, D = cfg.model.num_layers, 4, parts.model.expert_size, parts.model.embed_dim
    assert isinstance(gate, Int8Weight) and gate.values.dtype == jnp.int8
    assert gate.scale.shape == (L, E, F) and down.scale.shape == (L, E, D)
    assert not isinstance(q["blocks"]["mlp"]["router"][...], Int8Weight)
    tokens = jnp.asarray(random_rows(cfg, n_rows=8)["tokens"])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward = jax.jit(lambda p: nnx.merge(parts.graphdef, p)(tokens, jnp.ones_like(tokens),
                                                             positions).astype(jnp.float32))
    exact, quantized = np.asarray(forward(params)), np.asarray(forward(q))
    assert 0 < np.abs(quantized - exact).max() < 0.02 * np.abs(exact).max()


# Pipeline stages with experts: micro-batches of 4 rows, one per batch shard (fsdp x expert),
# so that each stage's MoE layers sort their own rows (the shard_map inside the stages' vmap).
STAGED = {"expert": 2, "fsdp": 2, "stage": 2}
SCHEDULES = {"gpipe": ("train.microbatches=2",),
             "circular": ("train.microbatches=2", "train.pipeline_repeats=2")}
# Each family's logits through one schedule (the stages do not depend on the family; the
# schedules differ in which layers each stage holds).
SCHEDULE_OF = {"mixtral": "gpipe", "qwen3_moe": "circular"}


@pytest.fixture(scope="module", params=list(MAKERS))
def imported_4_layers(request, tmp_path_factory):
    """As `imported`, with 4 layers: 2 stages of 2, or 2 stages of 2 blocks of 1 (circular)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = MAKERS[request.param](tmp / "hf", num_hidden_layers=4)
    return request.param, model, convert.import_hf(tmp / "hf", tmp / "run")


def test_pipeline_stages_give_the_logits_of_transformers(imported_4_layers):
    name, model, run = imported_4_layers
    expected = hf_logits(model, ROWS)
    got = our_logits(run, ROWS, STAGED, overrides=SCHEDULES[SCHEDULE_OF[name]])
    print(f"max |logit difference| {np.abs(got - expected).max():.2e} of {np.abs(expected).max():.2f}")
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() < 1e-4


def router_terms(run, mesh, overrides=()):
    """(objective, router metrics, the router weights' gradient of moe_aux_loss in model
    order, each layer's router statistics) for ROWS on a mesh, with two padding tokens that
    the router statistics skip."""
    parts = build_on(run_config(run, overrides), mesh)
    params = parts.to_run_order(restore_params(parts.cfg, parts.layout, None)[0])
    segments = np.ones_like(ROWS)
    segments[3, -2:] = 0
    batch = {"tokens": jnp.asarray(ROWS), "segment_ids": jnp.asarray(segments),
             "positions": jnp.broadcast_to(jnp.arange(ROWS.shape[1]), ROWS.shape)}
    def aux_loss(p, b):
        objective, (_, _, metrics) = objective_terms(parts.graphdef, p, b)
        return metrics["moe_aux_loss"], (objective, metrics)

    (_, (objective, metrics)), aux_grad = jax.jit(jax.value_and_grad(aux_loss, has_aux=True))(
        params, batch)
    router = parts.to_model_order(aux_grad)["blocks"]["mlp"]["router"][...]
    stats = jax.jit(lambda p, b: nnx.merge(parts.graphdef, p).hidden_and_stats(
        b["tokens"], b["segment_ids"], b["positions"])[1])(params, batch)
    return (float(objective), {k: float(v) for k, v in metrics.items()}, np.asarray(router),
            jax.tree.map(np.asarray, stats))


@pytest.mark.parametrize("imported_4_layers", ["mixtral"], indirect=True)
def test_pipeline_stages_give_the_router_losses_and_their_gradient_of_one_device(
        imported_4_layers):
    """The router statistics come through the stages summed over micro-batches, nothing from
    a stage in its bubble, layers in model order: each layer's statistics, the load-balancing
    loss, the objective and the loss's gradient with respect to each layer's router are one
    device's."""
    _, _, run = imported_4_layers
    ref_objective, ref_metrics, ref_grad, ref_stats = router_terms(run, None)
    objective, metrics, grad, stats = router_terms(run, STAGED, SCHEDULES["circular"])
    assert ref_stats["expert_tokens"].shape[0] == 4
    assert len({tuple(n) for n in ref_stats["expert_tokens"]}) > 1  # the layers differ
    for name, value in ref_stats.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-5, err_msg=name)
    assert ref_metrics["moe_aux_loss"] > 1.0
    for name, value in ref_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name
    assert objective == pytest.approx(ref_objective, rel=1e-5)
    assert np.abs(ref_grad).max() > 0
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("imported_4_layers", ["qwen3_moe"], indirect=True)
def test_pipeline_stages_load_balancing_loss_is_transformers(imported_4_layers):
    import torch
    _, model, run = imported_4_layers
    with torch.no_grad():
        out = model(torch.tensor(ROWS, dtype=torch.long), output_router_logits=True)
    parts = build_on(run_config(run, SCHEDULES["gpipe"]), STAGED)
    params, _ = restore_params(parts.cfg, parts.layout, None)
    batch = {"tokens": jnp.asarray(ROWS), "segment_ids": jnp.ones_like(ROWS),
             "positions": jnp.broadcast_to(jnp.arange(ROWS.shape[1]), ROWS.shape)}
    _, (_, _, metrics) = jax.jit(lambda p, b: objective_terms(parts.graphdef, p, b))(params, batch)
    assert abs(float(metrics["moe_aux_loss"]) - float(out.aux_loss)) < 1e-5


STAGED_MOE = ("model.family=mixtral", "model.num_experts=4", "model.num_layers=4",
              "model.router_z_loss_coef=0.001", "model.router_aux_loss_coef=0.1")


@pytest.fixture(scope="module")
def staged_moe_on_one_device():
    return run_steps(tiny_config(*STAGED_MOE), None)


@pytest.mark.parametrize("schedule, capacity", [("circular", 4)],
                         ids=["circular, capacity (all-to-all)"])
def test_moe_trains_through_pipeline_stages_as_on_one_device(staged_moe_on_one_device, schedule,
                                                             capacity):
    """The router losses (weighted up, so that their gradient counts) train the routers
    through the stages as on one device, dropless; so do tokens sent to their experts'
    devices inside the stages in capacity mode (a capacity that drops nothing here, so that
    the result is the dropless one-device run's)."""
    ref_losses, ref_params = staged_moe_on_one_device
    assert ref_losses[-1] < ref_losses[0]
    cfg = tiny_config(*STAGED_MOE, f"model.expert_capacity_factor={capacity}",
                      *SCHEDULES[schedule])
    losses, params = run_steps(cfg, STAGED)
    params = Pipeline(2, 2, cfg.train.pipeline_repeats).to_model(params)  # from stage order
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_flops_count_the_active_experts_only():
    cfg = dataclasses.replace(tiny_config("model.family=mixtral").model, vocab_size=384,
                              num_experts=8, experts_per_token=2)
    flops = family("mixtral").train_flops_per_token
    D, F, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers
    attention = D * cfg.num_heads * cfg.head_size * 2 + D * cfg.num_kv_heads * cfg.head_size * 2
    active = L * (attention + D * 8 + 2 * 3 * D * F) + D * 384
    assert flops(cfg, 32) == 6 * active + 6 * L * cfg.num_heads * cfg.head_size * 32
    more = dataclasses.replace(cfg, num_experts=64)  # more experts, same active ones
    assert flops(more, 32) - flops(cfg, 32) == 6 * L * D * 56


@pytest.mark.parametrize("name", ["mixtral-8x7b"])  # qwen3-30b-a3b's plan: BENCHMARKS.md
def test_the_released_shapes_plan_to_fit_a_node_of_eight_80_gib_gpus(name):
    """The shipped configs as they are: XLA's plan of the step per device, compiled for 8
    devices (abstract arrays: nothing is allocated), fits 80 GiB."""
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / f"{name}.yaml"))
    plan = step_memory(cfg)
    print(f"{name}: {plan['mesh']}, peak {plan['peak'] / 2**30:.1f} GiB")
    assert plan["devices"] == 8 and "expert=8" in plan["mesh"]
    assert 40 * 2**30 < plan["peak"] < 80 * 2**30


@pytest.mark.parametrize("imported", ["mixtral"], indirect=True)
def test_lm_eval_scores_a_mixture_of_experts_as_its_logits_say(imported):
    """The lm-eval backend on an imported MoE model, its experts split over mesh.expert=2:
    each continuation's log-likelihood is the one its logits on one device give."""
    pytest.importorskip("lm_eval")
    from pjit_llm.inference.lm_backend import PjitLM
    from test_lm_backend import _reference
    _, _, run = imported
    lm = PjitLM(run=str(run), batch_size=4, max_length=64, **{"mesh.expert": "2"})
    rng = np.random.default_rng(1)
    requests = [(rng.integers(0, 300, c).tolist(), rng.integers(0, 300, n).tolist())
                for c, n in [(3, 1), (9, 4), (20, 2), (12, 6)]]
    reference = _reference(run, [c + n for c, n in requests])
    out = lm._loglikelihood_tokens([(None, c, n) for c, n in requests], disable_tqdm=True)
    for (logprob, _), (c, n), logp in zip(out, requests, reference):
        expected = logp[np.arange(len(c) - 1, len(c) + len(n) - 1), n].sum()
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
