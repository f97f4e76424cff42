"""The planner: pruning arithmetic, collectives read from a real compiled program, the step-time
model's dominant term, the chosen config trains, refusals, and calibration."""

import dataclasses
import json
import math

import pytest

from conftest import E2E, assert_refused, build_on, run_module, tiny_config
from pjit_llm import perf
from pjit_llm.config import load_config
from pjit_llm.errors import UserError
from pjit_llm.parallel.axes import AXIS_NAMES
from pjit_llm.planning import candidates as cands
from pjit_llm.planning.calibrate import pick
from pjit_llm.models.expert_products import BLOCKS_SCOPE
from pjit_llm.planning.compiled import analyse, blocks_share, cached_analysis
from pjit_llm.planning.devices import KINDS, Cluster, DeviceKind, load_kinds, make_cluster
from pjit_llm.planning.estimate import estimate
from pjit_llm.planning.hlo import program_cost, replica_groups
from pjit_llm.planning.planner import (SMALL_TOP, _diverse, concrete_vocab, default_top, refuse,
                                       param_leaves, plan)
from pjit_llm.planning.report import spearman

H100 = KINDS["h100"]


def _sizes(**named):
    return tuple(named.get(a, 1) for a in AXIS_NAMES)


def _found(cfg, devices=8, per_host=8, budget=80e9):
    cfg = concrete_vocab(cfg)
    leaves = param_leaves(cfg)
    return cands.enumerate_candidates(cfg, leaves, make_cluster(H100, devices, per_host), budget)


def test_pruning_keeps_only_meshes_the_model_divides():
    cfg = tiny_config("model.num_heads=4", "model.num_kv_heads=2", "model.embed_dim=64")
    found, pruned = _found(cfg)
    assert found
    for c in found:
        s = c.mesh
        assert 4 % s["tensor"] == 0  # tensor divides the heads
        assert cfg.model.num_layers % s["stage"] == 0
        assert s["expert"] == 1  # a dense model has no experts to split
        assert (cfg.data.batch_size // c.grad_accum) % (s["data"] * s["stage"] * s["fsdp"]) == 0
    assert pruned["tensor does not divide the heads"] > 0
    assert pruned["expert axis without experts to split"] > 0


def test_tensor_and_context_stay_inside_hosts():
    found, _ = _found(tiny_config("data.batch_size=64"), devices=16, per_host=4)
    assert found
    for c in found:
        assert c.mesh["tensor"] <= 4 and c.mesh["context"] <= 4
        assert c.dcn[AXIS_NAMES.index("tensor")] == 1 and c.dcn[AXIS_NAMES.index("context")] == 1
        assert math.prod(c.dcn) == 4  # the hosts' pieces


def test_a_model_far_over_budget_is_pruned_before_compiling():
    _, pruned = _found(tiny_config(), budget=1e5)  # 100 kB a device
    assert pruned["analytic memory far over budget"] > 0
    found, _ = _found(tiny_config(), budget=1e5)
    assert not found


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), use_global", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, dim", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, x",
     [[0, 2], [1, 3]]),
    ("source_target_pairs={{0,1},{1,0}}, x", [[0, 1], [1, 0]]),
])
def test_replica_group_spellings(text, groups):
    assert replica_groups(text) == groups


def test_an_fsdp_step_gathers_parameters_over_fsdp():
    cfg = build_on(tiny_config(), fsdp=8).cfg
    result = analyse(cfg, 8)
    gathers = [c for c in result["collectives"] if c["op"] == "all-gather"]
    assert gathers and all(c["axes"] == ["fsdp"] for c in gathers)
    assert not any(c["across_hosts"] for c in result["collectives"])
    # The scanned layers' gathers run once per layer (the loop's trip count), forward and back.
    assert max(c["count"] for c in gathers) >= 2 * cfg.model.num_layers
    assert result["flops"] > 0 and result["memory"]["peak"] > 0


def test_a_second_analysis_of_the_same_config_comes_from_the_cache(tmp_path):
    cfg = build_on(tiny_config(), fsdp=8).cfg
    compiles = []

    def counted(*args):
        compiles.append(args)
        return analyse(*args)

    first, hit = cached_analysis(cfg, 8, tmp_path, compile_with=counted)
    assert not hit and len(compiles) == 1
    # what does not change the program does not miss the cache; what does, does
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir="elsewhere"))
    again, hit = cached_analysis(moved, 8, tmp_path, compile_with=counted)
    assert hit and again == json.loads(json.dumps(first)) and len(compiles) == 1
    deeper = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
    assert not cached_analysis(deeper, 8, tmp_path, compile_with=counted)[1]
    assert not cached_analysis(cfg, 8, tmp_path, compile_with=counted, variant="gpu")[1]


def test_collectives_over_a_host_split_axis_cross_hosts():
    cfg = build_on(tiny_config(), data=2, fsdp=4).cfg
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn_data=2))
    result = analyse(cfg, 8)
    over_data = [c for c in result["collectives"] if "data" in c["axes"]]
    only_fsdp = [c for c in result["collectives"] if c["axes"] == ["fsdp"]]
    assert over_data and all(c["across_hosts"] for c in over_data)
    assert only_fsdp and not any(c["across_hosts"] for c in only_fsdp)


def test_a_scoped_conditional_counts_its_branch_at_its_share():
    import jax
    import jax.numpy as jnp

    def blocks(x, used):  # the shape of the expert blocks' loop: a product per used block
        @jax.named_scope(BLOCKS_SCOPE)
        def body(total, n):
            return total + jax.lax.cond(n < used, lambda: x @ x,
                                        lambda: jnp.zeros_like(x)), None
        return jax.lax.scan(body, jnp.zeros_like(x), jnp.arange(8))[0]

    text = jax.jit(blocks).lower(jnp.ones((64, 64)), 3).compile().as_text()
    product = 2 * 64**3
    assert program_cost(text, 1).flops == pytest.approx(8 * product)
    seen = []
    shared = program_cost(text, 1, shares={BLOCKS_SCOPE: lambda n: seen.append(n) or 0.25})
    assert seen and set(seen) == {8}  # the share is a function of the loop's trip count
    assert shared.flops == pytest.approx(2 * product)
    # Balanced routing over 8 devices of one expert each: of N = R/b + 1 blocks, R/(8 b)
    # rounded up are used; with every expert here, all but the padding.
    assert blocks_share(8, 8)(17) == pytest.approx(2 / 17)
    assert blocks_share(8, 1)(24) == pytest.approx(16 / 24)


# In a process of its own: preparing for GPU programs changes how JAX lowers, for good.
_GPU_PROGRAMS = """
import json, sys
from pjit_llm.parallel.mesh import use_emulated_devices
use_emulated_devices(8)
import jax, jax.numpy as jnp
from pjit_llm import perf
from pjit_llm.config import load_config
from pjit_llm.planning import gpu_program
from pjit_llm.planning.compiled import analyse
gpu_program.prepare()

def loss(x, w, sizes):
    return jnp.square(jax.lax.ragged_dot(x, w, sizes).astype(jnp.float32)).sum()

grouped = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
    jax.ShapeDtypeStruct((256, 64), jnp.bfloat16), jax.ShapeDtypeStruct((4, 64, 32), jnp.bfloat16),
    jax.ShapeDtypeStruct((4,), jnp.int32))
text, memory = gpu_program.compile_for_gpu(grouped)
moe = analyse(load_config(sys.argv[1], sys.argv[2:]), 8, gpu=True)
square = jax.ShapeDtypeStruct((256, 256), jnp.float32)
plain = jax.jit(lambda a: jnp.tanh(a @ a).sum(0)).lower(square)
dumped = gpu_program.compile_for_gpu(plain)[1]["peak"]
planned = perf.compiled_memory(plain.compile())["peak"]
print(json.dumps({"text": text, "memory": memory, "moe": moe, "plain": [dumped, planned]}))
"""


def test_a_gpu_program_multiplies_each_row_by_its_group_once_and_keeps_bfloat16(tmp_path):
    moe = [str(E2E.parent.parent / "configs/tiny-moe.yaml"), "data.batch_size=8"]
    result = run_module(None, *moe, code=_GPU_PROGRAMS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    text = out["text"]
    assert text.count("ragged-dot(") == 3 and out["memory"]["peak"] > 0
    # the forward product, the rows' gradient and the weights' (one matrix per group, each
    # summed over its own rows): each 2 x rows x 64 x 32, not that for every group
    assert program_cost(text, 1).flops == pytest.approx(3 * 2 * 256 * 64 * 32)
    # with half the rows in this device's groups (the rest other devices' experts'), half the
    # work, and fewer bytes: the rows' arrays at half, the weights and their gradient whole
    half = program_cost(text, 1, rows_share=0.5)
    assert half.flops == pytest.approx(3 * 256 * 64 * 32)
    assert program_cost(text, 1).bytes > half.bytes > program_cost(text, 1).bytes / 2
    assert "bf16[4,64,32]" in text and "f32[256,64]" not in text  # not widened as on XLA:CPU
    # the memory plan read from XLA's dump is the one a compiled program reports
    dumped, planned = out["plain"]
    assert dumped == pytest.approx(planned, rel=1e-3)
    # The whole tiny MoE step for a GPU (experts split 4 ways): each device multiplies its
    # quarter of the gathered rows, no padded blocks, so the step computes the model's FLOPs
    # (plus the float32 router and the masked half of attention).
    gpu = out["moe"]
    assert gpu["memory"]["peak"] > 0 and "refused" not in gpu
    cfg = load_config(moe[0], moe[1:])
    model_flops = perf.flops_per_step(cfg.model, 8, cfg.data.seq_len) / 8
    assert model_flops < gpu["flops"] < 1.25 * model_flops


def test_an_update_in_place_counts_the_update_not_the_buffer_even_across_a_type_change():
    import jax
    import jax.numpy as jnp

    def fill(buffer, row):  # a scan writing one row a step (XLA:CPU: in float32, converted)
        def body(b, i):
            return jax.lax.dynamic_update_index_in_dim(b, row * i.astype(row.dtype), i, 0), None
        return jax.lax.scan(body, buffer, jnp.arange(16))[0]

    buffer = jnp.zeros((16, 256, 256), jnp.bfloat16)
    lowered = jax.jit(fill, donate_argnums=0).lower(buffer, jnp.ones((256, 256), jnp.bfloat16))
    text = lowered.compile().as_text()
    assert "dynamic-update-slice_convert_fusion" in text
    moved = program_cost(text, 1).bytes
    assert moved < 16 * buffer.nbytes / 2  # the whole buffer read and written: 4x that


def _synthetic(flops=0.0, bytes_=0.0, collectives=()):
    return {"flops": flops, "bytes": bytes_, "collectives": list(collectives), "bubble": 0.0}


def test_the_dominant_term():
    kind = H100
    assert estimate(_synthetic(flops=1e15, bytes_=1e9), kind).dominant == "compute"
    assert estimate(_synthetic(flops=1e12, bytes_=1e13), kind).dominant == "memory"
    across = {"op": "all-to-all", "link_bytes": 1e11, "count": 1, "axes": ["expert"],
              "across_hosts": True}
    est = estimate(_synthetic(flops=1e14, collectives=[across]), kind)
    assert est.dominant == "collectives (blocking)"
    # The same bytes inside a host (NVLink, 9 times the network) no longer dominate.
    inside = estimate(_synthetic(flops=1e14, collectives=[{**across, "across_hosts": False}]), kind)
    assert inside.step_s < est.step_s
    # A gradient reduction over data hides behind compute when the kind overlaps.
    grads = {"op": "all-reduce", "link_bytes": 1e9, "count": 1, "axes": ["data"],
             "across_hosts": False}
    hidden = estimate(_synthetic(flops=1e15, collectives=[grads]), kind)
    assert hidden.step_s == pytest.approx(1e15 / (kind.compute_share * kind.peak_flops))
    serial = dataclasses.replace(kind, overlap=False)
    assert estimate(_synthetic(flops=1e15, collectives=[grads]), serial).step_s > hidden.step_s


# Figures of the emulated CPU devices' order (as planning/probe.py measures them): no overlap,
# collectives that cost a rendezvous, kernels that cost a dispatch.
CPU_LIKE = DeviceKind("cpu", 2e10, 3e9, 4e9, 2e9, 2e9, compute_share=1.0, link_latency=7e-5,
                      overlap=False, flash_attention=False, kernel_overhead=1e-6,
                      element_rate=4e9)


def test_serial_kinds_add_memory_elementwise_collectives_and_kernel_overheads():
    analysis = {**_synthetic(flops=2e10, bytes_=8e9), "dot_bytes": 4e9, "kernels": 1000,
                "element_ops": 2e9,
                "collectives": [{"op": "all-gather", "link_bytes": 2e9, "count": 10,
                                 "axes": ["fsdp"], "across_hosts": False}]}
    est = estimate(analysis, CPU_LIKE)
    # compute, the bytes of kernels without a matrix product, their elementwise operations,
    # the gathers, the kernels
    assert est.step_s == pytest.approx(1 + 1 + 0.5 + 10 * (7e-5 + 1) + 1000 * 1e-6)
    assert est.terms["kernel overhead"] == pytest.approx(1e-3)
    assert est.terms["elementwise"] == pytest.approx(0.5)
    on_a_gpu = estimate(analysis, H100).terms  # neither is counted on a data-sheet kind
    assert on_a_gpu["kernel overhead"] == on_a_gpu["elementwise"] == 0


def test_one_device_is_probed_without_collectives_and_its_estimate_is_finite():
    import jax

    from pjit_llm.planning.probe import measure_kind

    kind = measure_kind(jax.devices()[:1], 1e9)
    assert kind.host_link == kind.network_link == math.inf and kind.link_latency == 0
    assert kind.peak_flops > 0 and kind.hbm_bandwidth > 0 and kind.kernel_overhead > 0
    # a one-device program's degenerate collective moves nothing over no link
    analysis = {**_synthetic(flops=1e9), "collectives": [
        {"op": "all-reduce", "link_bytes": 0.0, "count": 3, "axes": [], "across_hosts": False}]}
    assert math.isfinite(estimate(analysis, kind).step_s)


def test_elementwise_operations_are_counted_per_element_inside_fusions():
    import jax
    import jax.numpy as jnp

    def chain(x):  # 2 x 8 operations per element, fused into one kernel, then a sum
        for _ in range(8):
            x = x * 0.5 + 1.0
        return x, jnp.sum(x)

    text = jax.jit(chain).lower(jnp.ones((1000,))).compile().as_text()
    assert program_cost(text, 1).element_ops == pytest.approx(17 * 1000, rel=0.1)


def test_a_small_model_compiles_every_mesh_including_plain_data_and_fsdp():
    cfg = concrete_vocab(tiny_config())
    leaves = param_leaves(cfg)
    cluster = make_cluster(CPU_LIKE, 8, 8)
    found, _ = cands.enumerate_candidates(cfg, leaves, cluster, 3e9)
    assert default_top(leaves, gpu=False) == SMALL_TOP
    ranked = sorted(found, key=lambda c: cands.analytic_time(cfg, leaves, c, cluster))
    chosen = {c.sizes for c in _diverse(ranked, SMALL_TOP)}
    assert _sizes(data=8) in chosen and _sizes(fsdp=8) in chosen
    # Memory traffic counts: the width-wide activations tensor parallelism replicates make
    # tensor=8 slower than data=8 by formula, as it measures.
    time = {c.sizes: cands.analytic_time(cfg, leaves, c, cluster) for c in found
            if c.remat == "none" and c.grad_accum == 1 and not c.loss_chunk}
    assert time[_sizes(data=8)] < time[_sizes(tensor=8)]


def test_calibration_runs_the_head_of_the_plan_and_a_spread_of_the_rest():
    times = [1.0, 1.0, 1.01, 1.02, 1.02, 1.03, 1.03, 1.04, 1.5, 2.0, 2.1, 3.0]
    rows = [{"fits": i != 3, "n": i, "estimate": estimate(_synthetic(flops=t * 4.945e14), H100)}
            for i, t in enumerate(times)]
    chosen = [r["n"] for r in pick(rows, 6)]
    # the three best, then the rest at evenly spaced predicted times, not the near-ties
    assert chosen == [0, 1, 2, 8, 10, 11]


def test_attention_scores_memory_is_measured_by_a_half_sequence_twin():
    cfg = build_on(tiny_config("data.seq_len=256", "data.batch_size=8"), data=8).cfg
    result = analyse(cfg, 8, scores=True)
    one_layer = 4 * 1 * cfg.model.num_heads * 256 * 256  # a device's (1, H, L, L) float32
    assert one_layer <= result["score_memory"] < result["memory"]["peak"]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_a_candidate_over_budget_is_never_chosen(tmp_path):
    cfg = tiny_config()
    small = DeviceKind("small", 1e12, 1.0, 1e11, 1e10, 1e9, flash_attention=False)
    cluster = Cluster(small, 8, 8)
    rows, _ = plan(cfg, cluster, small, 1e12, 2, tmp_path, compile_with=analyse)
    best = rows[0]
    # Just too little memory for the fastest candidate: another one is chosen, or none.
    budget = best["memory"] - 1
    try:
        rows, _ = plan(cfg, cluster, small, budget, 2, tmp_path, compile_with=analyse)
    except UserError as e:
        assert "smallest cluster" in str(e)
        return
    assert rows[0]["fits"] and rows[0]["memory"] <= budget
    assert rows[0]["candidate"] != best["candidate"]
    assert all(r["memory"] > budget for r in rows if not r["fits"])


def test_plan_calibrates_and_writes_a_config_that_trains(tmp_path):
    out = tmp_path / "plan.yaml"
    plan_args = ["--devices", "8", "--top", "2", "--cache", str(tmp_path / "cache"), *TINY_PLAN]
    result = run_module("pjit_llm.plan", *plan_args, "--calibrate", "2", "--steps", "1",
                        "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dominates" in result.stdout and out.exists()
    assert "measured s" in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith("Spearman"))
    assert -1 <= float(line.split(":")[1].split(";")[0]) <= 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # one analysis per candidate
    trained = run_module("pjit_llm.train", "--config", str(out), "train.steps=2",
                         "train.run_dir=run", "data.num_workers=0", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "metrics.jsonl").exists()


TINY_PLAN = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=8",
             "model.num_kv_heads=4", "model.mlp_dim=128", "model.vocab_size=384",
             "data.seq_len=32", "data.batch_size=16", "optimizer.warmup_steps=1",
             "train.steps=10"]


def test_an_impossible_request_is_refused_naming_the_smallest_cluster():
    result = run_module("pjit_llm.plan", "--config", "configs/llama-8b.yaml", "--devices", "1",
                        "--device", "h100", "--headroom", "0.5", "--no-cache",
                        cwd=E2E.parent.parent)
    assert_refused(result, "no candidate mesh, remat and batch split fits the model on 1 x h100")
    assert "the smallest cluster that would fit is 4 x h100 (--devices 4)" in result.stderr
    # ... which is where a candidate's analytic memory first comes within the budget
    cfg = concrete_vocab(load_config(str(E2E.parent.parent / "configs/llama-8b.yaml"), []))
    leaves = param_leaves(cfg)
    for devices, fits in ((2, False), (4, True)):
        found, _ = cands.enumerate_candidates(cfg, leaves, make_cluster(H100, devices, 8),
                                              0.5 * 80e9)
        assert any(cands.analytic_memory(cfg, leaves, c) <= 0.5 * 80e9 for c in found) == fits


def test_a_device_file_describes_further_kinds_and_a_bad_one_is_refused(tmp_path):
    good = tmp_path / "kinds.yaml"
    good.write_text("gb300:\n  peak_tflops: 2500\n  hbm_gib: 279\n  hbm_tb_s: 8\n"
                    "  host_link_gb_s: 900\n  network_link_gb_s: 100\n  compute_share: 0.45\n")
    kind = load_kinds(str(good))["gb300"]
    assert (kind.peak_flops, kind.hbm_bytes, kind.network_link, kind.compute_share) == (
        2.5e15, 279 * 2**30, 1e11, 0.45)
    bad = tmp_path / "bad.yaml"
    bad.write_text("x1:\n  peak_tflops: 1\n  hbm_gib: 1\n  hbm_tb_s: 1\n  host_link_gb_s: 1\n")
    with pytest.raises(UserError, match="x1 has no network_link_gb_s"):
        load_kinds(str(bad))
    bad.write_text("x1:\n  peak_tflops: -1\n  hbm_gib: 1\n  hbm_tb_s: 1\n  host_link_gb_s: 1\n"
                   "  network_link_gb_s: 1\n")
    with pytest.raises(UserError, match="x1's peak_tflops=-1 must be positive"):
        load_kinds(str(bad))


def test_a_batch_too_small_for_a_larger_cluster_is_named_as_the_obstacle():
    cfg = concrete_vocab(tiny_config("data.batch_size=2"))
    leaves = param_leaves(cfg)
    one_per_host = Cluster(H100, 2, 1)  # tensor and context stay inside a host of one
    with pytest.raises(UserError, match="no larger cluster can split its data.batch_size=2 "
                                        "rows further .*raise data.batch_size"):
        refuse(cfg, leaves, one_per_host, 1e3, "nothing fits")
