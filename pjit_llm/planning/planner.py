"""From a config and a cluster to ranked candidates: enumerate and prune by arithmetic
(candidates.py), compile the most promising by the formula estimate (compiled.py, cached),
drop those whose memory plan is over budget, and rank the rest by the step-time model
(estimate.py). A request nothing fits is refused naming the smallest cluster that would."""

import dataclasses
import math
import sys
from pathlib import Path

import jax

from pjit_llm import perf
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.metrics import human_bytes
from pjit_llm.models.layers import padded_vocab
from pjit_llm.parallel.axes import AXIS_NAMES
from pjit_llm.placement import BYTE_VOCAB, place
from pjit_llm.parallel.layout import is_variable
from pjit_llm.parallel.settings import MeshConfig
from pjit_llm.planning import candidates as cands
from pjit_llm.planning import gpu_program
from pjit_llm.planning.compiled import cached_analysis
from pjit_llm.planning.devices import Cluster
from pjit_llm.planning.estimate import estimate, flash
from pjit_llm.planning.worker import CompileWorker


def concrete_vocab(cfg: Config) -> Config:
    if cfg.model.vocab_size:
        return cfg
    model = dataclasses.replace(cfg.model, vocab_size=padded_vocab(BYTE_VOCAB),
                                real_vocab_size=BYTE_VOCAB)
    return dataclasses.replace(cfg, model=model)


def param_leaves(cfg: Config) -> list[cands.ParamLeaf]:
    """The parameters' shapes, logical axes and element sizes (abstract, on one device)."""
    one = dataclasses.replace(cfg, mesh=MeshConfig(data=1, rules=cfg.mesh.rules))
    placed = place(one, devices=jax.devices()[:1], batches=False, announce=False)
    leaves = jax.tree.leaves(placed.abstract_params, is_leaf=is_variable)
    return [cands.ParamLeaf(tuple(v.shape), tuple(v.logical_axes), v.dtype.itemsize)
            for v in leaves]


def _progress(i: int, n: int, what: str) -> None:
    """A progress bar on a terminal (nothing when stderr is a file or a pipe)."""
    if not sys.stderr.isatty():
        return
    width = 24
    done = width * i // max(n, 1)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what[:60]:<60}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


# How many candidates are compiled by default: a GPU's program stops compiling before any code
# is emitted (gpu_program.py) and a small model compiles in seconds, so up to SMALL_TOP are
# compiled and the program decides; a large model compiled in full for the CPU takes minutes,
# so only the formula's LARGE_TOP most promising.
SMALL_MODEL, SMALL_TOP, LARGE_TOP = 1e8, 24, 8


def default_top(leaves: list[cands.ParamLeaf], gpu: bool) -> int:
    params = sum(math.prod(l.shape) for l in leaves)
    return SMALL_TOP if gpu or params < SMALL_MODEL else LARGE_TOP


def _diverse(ranked: list[cands.Candidate], top: int) -> list[cands.Candidate]:
    """The `top` first of `ranked`, taking the best of each remat policy, then the best of each
    kind of parallelism (the set of axes it splits: a mixture of experts' expert axis among
    them), then of each mesh's sizes, then of each placement over hosts, then of each
    (mesh, remat), before any second of a kind: the formula ranks, the compile decides."""
    picked: list[cands.Candidate] = []
    for key in (lambda c: c.remat, lambda c: tuple(n > 1 for n in c.sizes), lambda c: c.sizes,
                lambda c: (c.sizes, c.dcn), lambda c: (c.sizes, c.dcn, c.remat), lambda c: c):
        seen = {key(c) for c in picked}
        for c in ranked:
            if key(c) not in seen and c not in picked:
                seen.add(key(c))
                picked.append(c)
    return picked[:top]


def smallest_cluster(cfg: Config, leaves, cluster: Cluster, budget: float) -> tuple[int | None,
                                                                                  bool]:
    """The fewest devices (whole hosts, doubling) on which some candidate's analytic memory
    fits the budget: what a refusal names; and whether any larger cluster had candidates at all
    (a batch too small to split over more devices has none)."""
    n, splits = cluster.devices, False
    for _ in range(16):
        n *= 2
        bigger = dataclasses.replace(cluster, devices=n)
        found, _ = cands.enumerate_candidates(cfg, leaves, bigger, budget)
        splits |= bool(found)
        if any(cands.analytic_memory(cfg, leaves, c) <= budget for c in found):
            return n, True
    return None, splits


def refuse(cfg: Config, leaves, cluster: Cluster, budget: float, why: str) -> None:
    n, splits = smallest_cluster(cfg, leaves, cluster, budget)
    if n:
        where = (f"the smallest cluster that would fit is {n} x {cluster.kind.name} "
                 f"(--devices {n}), or shorten data.seq_len / data.batch_size")
    elif not splits:
        where = (f"no larger cluster can split its data.batch_size={cfg.data.batch_size} rows "
                 f"further (data x stage x fsdp x expert divide them): raise data.batch_size "
                 f"and spread it over more devices, or shorten data.seq_len")
    else:
        where = ("no cluster up to 65,536 times this one fits it; shorten data.seq_len / "
                 "data.batch_size")
    raise UserError(f"{why} on {cluster.describe()} within {human_bytes(budget)} a device; "
                    f"{where}")


def plan(cfg: Config, cluster: Cluster, kind_for_estimate, budget: float, top: int,
         cache_dir: Path | None, remats=cands.REMATS, progress=_progress,
         compile_with=None) -> tuple[list[dict], dict]:
    """Ranked rows (fitting first, by predicted step time) and what pruning removed.
    `compile_with`: compiled.py's `analyse` to compile in this process (its devices must be
    the cluster's); by default a worker process compiles."""
    cfg = concrete_vocab(cfg)
    leaves = param_leaves(cfg)
    found, pruned = cands.enumerate_candidates(cfg, leaves, cluster, budget, remats)
    if not found:
        refuse(cfg, leaves, cluster, budget, "no candidate mesh, remat and batch split fits the "
               "model")  # noqa
    ranked = sorted(found, key=lambda c: (cands.analytic_memory(cfg, leaves, c) > budget,
                                          cands.analytic_time(cfg, leaves, c, cluster)))
    gpu = kind_for_estimate.name != "cpu"  # planned for GPUs, not this machine's CPU
    chosen = _diverse(ranked, top or default_top(leaves, gpu))
    rows, cached = [], 0
    worker = CompileWorker(cluster.devices, gpu)
    compile_with = compile_with or worker.analyse
    flops = perf.flops_per_step(cfg.model, cfg.data.batch_size, cfg.data.seq_len)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    try:
        for i, cand in enumerate(chosen):
            progress(i, len(chosen), f"compiling {cand.describe_mesh()} {cand.remat} "
                     f"{cand.describe_schedule()}")
            try:
                run_cfg = cands.apply(cfg, cand)
            except UserError as e:
                pruned[str(e)[:60]] += 1
                continue
            scores = kind_for_estimate.flash_attention and cand.mesh["context"] == 1
            analysis, hit = cached_analysis(run_cfg, cluster.devices, cache_dir, scores,
                                            compile_with, gpu_program.VARIANT * gpu)
            cached += hit
            if "refused" in analysis:
                pruned["refused: " + analysis["refused"][:100]] += 1
                continue
            est = estimate(analysis, kind_for_estimate)
            memory = analysis["memory"].get("peak") or cands.analytic_memory(cfg, leaves, cand)
            if flash(analysis, kind_for_estimate):  # the flash kernel allocates no (seq, seq)
                memory -= analysis.get("score_memory", 0.0)
            rows.append({"candidate": cand, "config": run_cfg, "analysis": analysis,
                         "estimate": est, "memory": memory, "fits": memory <= budget,
                         "tokens_per_s": tokens / est.step_s,
                         "mfu": flops / est.step_s / cluster.devices
                         / kind_for_estimate.peak_flops})
    finally:
        worker.close()
    progress(len(chosen), len(chosen), f"done ({cached} of {len(chosen)} from the cache)")
    rows.sort(key=lambda r: (not r["fits"], r["estimate"].step_s))
    if not rows:
        why = next((k for k in pruned if k.startswith("refused: ")), "refused: unknown")
        raise UserError(f"none of the {len(chosen)} candidates compiled on {cluster.describe()} "
                        f"({why}); compile more with --top, or choose a mesh by hand")
    if not rows[0]["fits"]:
        refuse(cfg, leaves, cluster, budget, "no compiled candidate's memory plan fits")
    info = {"enumerated": len(found), "compiled": len(chosen), "cached": cached,
            "pruned": dict(pruned), "devices_per_candidate": math.prod(rows[0]["candidate"].sizes),
            "axes": AXIS_NAMES}
    return rows, info
