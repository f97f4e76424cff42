"""The candidates a plan chooses from, and what arithmetic rules out before anything compiles.

A candidate is a mesh (a size per mesh axis, and how many pieces of each lie across hosts), a
remat policy, gradient accumulation, pipeline micro-batches and repeats, and loss chunking.
`enumerate_candidates` walks them all and drops, with the reason counted, those the model or
batch cannot be cut into (divisibility, heads per tensor shard, layers per stage, batch rows
per shard), those that cross hosts with the axes that talk every layer (tensor, context), and
those whose analytic memory is far over the budget. `analytic_memory` is a floor-plan count
of the state and the activations kept per layer; `analytic_time` the same roofline as
estimate.py on formula collectives: both only rank and prune, the compiled program decides.
"""

import dataclasses
import itertools
import math
from collections import Counter
from dataclasses import dataclass

from pjit_llm import perf
from pjit_llm.config import Config
from pjit_llm.parallel.axes import AXIS_NAMES
from pjit_llm.planning.devices import Cluster

REMATS = ("none", "proj", "full")
# How many forward passes each remat policy runs in all (the backward pass is two).
RECOMPUTE = {"none": 3.0, "dots": 3.1, "proj": 3.2, "proj_attn": 3.1, "proj_offload": 3.2,
             "full": 4.0}
# Bytes kept per token and layer for the backward pass, in units of (embed, mlp) widths times
# the compute dtype's bytes: none keeps every intermediate, proj the projections' outputs,
# full only the layer's input.
KEPT = {"none": (17, 4), "dots": (8, 3), "proj": (8, 3), "proj_attn": (8, 3),
        "proj_offload": (1, 0), "full": (1, 0)}
FAR_OVER = 2.0  # an analytic estimate this many times the budget is pruned without compiling


@dataclass(frozen=True)
class Candidate:
    sizes: tuple[int, ...]  # per mesh axis, in AXIS_NAMES order
    dcn: tuple[int, ...]  # pieces of each across hosts
    remat: str
    grad_accum: int
    microbatches: int = 0
    repeats: int = 1
    loss_chunk: int = 0

    @property
    def mesh(self) -> dict[str, int]:
        return dict(zip(AXIS_NAMES, self.sizes))

    def overrides(self) -> list[str]:
        """The config keys this candidate sets."""
        keys = [f"mesh.{a}={n}" for a, n in zip(AXIS_NAMES, self.sizes)]
        keys += [f"mesh.dcn_{a}={n}" for a, n in zip(AXIS_NAMES, self.dcn)]
        return keys + [f"model.remat={self.remat}", f"model.loss_chunk={self.loss_chunk}",
                       f"train.grad_accum={self.grad_accum}",
                       f"train.microbatches={self.microbatches}",
                       f"train.pipeline_repeats={self.repeats}"]

    def describe_mesh(self) -> str:
        parts = []
        for a, n, d in zip(AXIS_NAMES, self.sizes, self.dcn):
            if n > 1:
                parts.append(f"{a}={n}" + (f"({d} hosts)" if d > 1 else ""))
        return " ".join(parts) or "1 device"

    def describe_schedule(self) -> str:
        s = self.mesh["stage"]
        pipe = f" M={self.microbatches} R={self.repeats}" if s > 1 else ""
        return f"ga={self.grad_accum}{pipe}"


def apply(cfg: Config, cand: Candidate) -> Config:
    """`cfg` with the candidate's settings (validated like a loaded config)."""
    mesh = dataclasses.replace(cfg.mesh, **cand.mesh,
                               **{f"dcn_{a}": n for a, n in zip(AXIS_NAMES, cand.dcn)})
    model = dataclasses.replace(cfg.model, remat=cand.remat, loss_chunk=cand.loss_chunk)
    train = dataclasses.replace(cfg.train, grad_accum=cand.grad_accum,
                                microbatches=cand.microbatches, pipeline_repeats=cand.repeats)
    out = dataclasses.replace(cfg, mesh=mesh, model=model, train=train)
    out.validate()
    return out


def _factorizations(n: int, parts: int):
    """Every ordered tuple of `parts` positive integers whose product is n."""
    if parts == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorizations(n // d, parts - 1):
                yield (d, *rest)


def _dcn_splits(sizes: tuple[int, ...], hosts: int, may_cross: set[str]):
    """Every way of putting `hosts` pieces on the axes allowed to cross hosts."""
    options = [[d for d in range(1, n + 1) if n % d == 0 and hosts % d == 0]
               if a in may_cross else [1] for a, n in zip(AXIS_NAMES, sizes)]
    for dcn in itertools.product(*options):
        if math.prod(dcn) == hosts:
            yield tuple(dcn)


@dataclass
class ParamLeaf:
    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    bytes_per_element: int


def shards_of(leaf: ParamLeaf, sizes: dict[str, int], rules, kv_split: bool) -> int:
    """How many pieces the layout cuts a parameter into (parallel/layout.py's rule: a mesh
    axis of size 1 is skipped, each mesh axis used once per array, first dimension first)."""
    taken, total = set(), 1
    for logical in leaf.logical:
        if logical is None or (logical == "kv_heads" and not kv_split):
            continue
        for a in getattr(rules, logical):
            if sizes[a] > 1 and a not in taken:
                taken.add(a)
                total *= sizes[a]
    return total


def _kv_split(cfg: Config, sizes: dict[str, int]) -> bool:
    heads = math.prod(sizes[a] for a in cfg.mesh.rules.heads)
    return math.lcm(cfg.model.num_kv_heads, heads) == cfg.model.num_kv_heads


def state_bytes(cfg: Config, leaves: list[ParamLeaf], sizes: dict[str, int]) -> float:
    """Parameters, gradients and two AdamW moments per device, in the parameters' dtype."""
    kv = _kv_split(cfg, sizes)
    return sum(4 * math.prod(l.shape) * l.bytes_per_element
               / shards_of(l, sizes, cfg.mesh.rules, kv) for l in leaves)


def _active_mlp(model) -> int:
    k = getattr(model, "experts_per_token", 0)
    return k * model.expert_size if k else model.mlp_dim


def _mlp_rows(model, mesh: dict) -> int:
    """Rows of the MLP's products per token on a device: 1 for a dense MLP; for experts, the k
    assignments, times the expert group's devices when dropless (each device's products are
    sized for every row gathered from its group: models/expert_dispatch.py)."""
    k = getattr(model, "experts_per_token", 0)
    if not k:
        return 1
    return k * (mesh["expert"] if model.expert_capacity_factor == 0 else 1)


def analytic_memory(cfg: Config, leaves: list[ParamLeaf], cand: Candidate) -> float:
    """A floor-plan estimate of the step's bytes per device: the state, what every layer keeps
    for the backward pass, one layer's working set and the logits. A pipeline stage keeps only
    its input for each of its iterations and recomputes one iteration's layers at a time
    (parallel/stages.py)."""
    m, s = cfg.model, cand.mesh
    dt = 2 if m.dtype == "bfloat16" else 4
    batch_shards = s["data"] * s["stage"] * s["fsdp"] * s["expert"]
    shard = cfg.data.batch_size / cand.grad_accum / batch_shards * cfg.data.seq_len / s["context"]
    tokens, layers, inputs = shard, m.num_layers / s["stage"], 0.0
    if s["stage"] > 1:  # per device and micro-batch: the batch shard's share of one
        iterations = cand.microbatches * cand.repeats + s["stage"] - 1
        tokens = shard * s["stage"] / cand.microbatches
        inputs = iterations * tokens * dt * m.embed_dim
        layers /= cand.repeats
    d_units, f_units = KEPT[cand.remat]
    rows = _mlp_rows(m, s)
    experts = getattr(m, "experts_per_token", 0)
    mlp = (rows * m.expert_size if experts else m.mlp_dim) / s["tensor"]
    routed = 2 * rows * m.embed_dim if experts else 0  # the experts' rows in and out
    per_layer = tokens * dt * (d_units * m.embed_dim + f_units * mlp + (d_units > 1) * routed)
    working = tokens * dt * (14 * m.embed_dim + 4 * mlp + routed)
    chunk = cand.loss_chunk or cfg.data.seq_len
    logits = 3 * 4 * shard * chunk / cfg.data.seq_len * m.vocab_size / s["tensor"]
    return state_bytes(cfg, leaves, s) + inputs + layers * per_layer + working + logits


# Per layer and forward pass, in the compiled programs of this project's decoder: about this
# many kernels (norms, projections, rotary, attention, MLP, residuals) and bytes moved per token
# in units of the (embed, per-device mlp) widths times the compute dtype's bytes.
LAYER_KERNELS = 40
LAYER_TRAFFIC = (24, 6)
OPTIMIZER_TRAFFIC = 7 * 4  # AdamW reads parameter, gradient, two moments, writes three (fp32)


def analytic_time(cfg: Config, leaves: list[ParamLeaf], cand: Candidate,
                  cluster: Cluster) -> float:
    """Seconds per step by formula, the same model as estimate.py on counted terms: compute at
    the calibrated share of peak with the remat's recomputation; memory traffic of the layers'
    activations, attention's (seq, seq) scores where no flash kernel keeps them on chip, the
    logits and the optimizer's update of the state this device holds (all of it on every
    data-parallel replica); the parameters' gathers and the gradients' reductions (hidden
    behind compute where the kind overlaps); tensor-parallel reductions, context gathers,
    expert exchanges and pipeline sends of every layer, each paying the kind's latency; every
    kernel its overhead; and the pipeline bubble."""
    m, s, k = cfg.model, cand.mesh, cluster.kind
    n = cluster.devices
    dt = 2 if m.dtype == "bfloat16" else 4
    passes = RECOMPUTE[cand.remat]
    flops = perf.flops_per_step(m, cfg.data.batch_size, cfg.data.seq_len) * passes / 3
    compute = flops / n / (k.compute_share * k.peak_flops)

    def link(axis):
        return k.network_link if cand.dcn[AXIS_NAMES.index(axis)] > 1 else k.host_link

    share = lambda a: (s[a] - 1) / s[a]  # noqa: E731
    layers = m.num_layers / s["stage"]
    ticks, launches = 1.0, 1.0
    if s["stage"] > 1:  # each stage runs its layers once per micro-batch and bubble slot
        slots = cand.microbatches * cand.repeats + s["stage"] - 1
        ticks = slots / (cand.microbatches * cand.repeats)  # on 1/M of the tokens each
        launches = slots / cand.repeats
    # Tokens through this device's layers per step, and their kernels and collectives.
    tokens = cfg.data.batch_size * cfg.data.seq_len / (
        s["data"] * s["fsdp"] * s["expert"] * s["context"])
    heads = m.num_heads / s["tensor"]
    d_units, f_units = LAYER_TRAFFIC
    traffic = passes * layers * ticks * tokens * dt * (
        d_units * m.embed_dim + f_units * _active_mlp(m) / s["tensor"])
    if not (k.flash_attention and s["context"] == 1):
        traffic += passes * layers * ticks * 4 * 4 * tokens * heads * cfg.data.seq_len
    vocab = m.vocab_size / s["tensor"]
    traffic += 6 * 4 * cfg.data.batch_size * cfg.data.seq_len / (n / s["tensor"]) * vocab
    params = sum(math.prod(l.shape) for l in leaves)
    held = params / (s["tensor"] * s["stage"] * s["expert"] * s["fsdp"])
    traffic += OPTIMIZER_TRAFFIC * held
    memory = traffic / k.hbm_bandwidth
    kernels = passes * layers * launches * cand.grad_accum * LAYER_KERNELS

    shard = params / (s["tensor"] * s["stage"] * s["expert"])
    hidden = (cand.grad_accum * 2 * dt * shard * share("fsdp") / link("fsdp")
              + 2 * 4 * shard / s["fsdp"] * share("data") / link("data") * k.reduce_slowdown)
    per_layer = m.embed_dim * dt * tokens / cand.grad_accum
    blocking = passes * layers * ticks * cand.grad_accum * (
        2 * 2 * per_layer * share("tensor") / link("tensor") * k.reduce_slowdown
        + 2 * per_layer * share("context") / link("context")
        + 2 * per_layer * getattr(m, "experts_per_token", 0) * share("expert") / link("expert"))
    calls = passes * layers * launches * cand.grad_accum * (
        4 * (s["tensor"] > 1) + 2 * (s["context"] > 1) + 2 * (s["expert"] > 1)
        + 2 * (s["stage"] > 1) + 6 * (s["fsdp"] > 1)) + (s["data"] > 1)
    blocking += calls * k.link_latency
    overhead = kernels * k.kernel_overhead
    if k.overlap:
        step = max(compute, memory, hidden) + blocking + overhead
    else:
        step = compute + memory + hidden + blocking + overhead
    if s["stage"] > 1:  # idle stages' slots: on top of the compute already counted
        step += compute * (s["stage"] - 1) / (cand.microbatches * cand.repeats)
    return step


def enumerate_candidates(cfg: Config, leaves: list[ParamLeaf], cluster: Cluster,
                         budget: float, remats=REMATS) -> tuple[list[Candidate], Counter]:
    """The candidates arithmetic allows, and how many were pruned for each reason."""
    m, B, L = cfg.model, cfg.data.batch_size, cfg.data.seq_len
    moe = hasattr(m, "num_experts")
    pruned: Counter = Counter()
    out = []
    chunks = sorted({0, cfg.model.loss_chunk or min(1024, L // 2)} - {L})
    accums = [g for g in (1, 2, 4, 8, 16, 32, 64) if B % g == 0]
    may_cross = {"data", "stage", "fsdp", "expert"}
    for sizes in _factorizations(cluster.devices, len(AXIS_NAMES)):
        s = dict(zip(AXIS_NAMES, sizes))
        reason = _mesh_reason(cfg, s, cluster, moe)
        if reason:
            pruned[reason] += 1
            continue
        dcns = list(_dcn_splits(sizes, cluster.hosts, may_cross))
        if not dcns:
            pruned["tensor or context would cross hosts"] += 1
            continue
        for dcn, remat, g, chunk in itertools.product(dcns, remats, accums, chunks):
            rows = B // g
            shards = s["data"] * s["stage"] * s["fsdp"] * s["expert"]
            if rows % shards:
                pruned["batch rows do not split over the batch shards"] += 1
                continue
            if chunk and chunk % s["context"]:
                pruned["loss chunk not divisible by context"] += 1
                continue
            for micro, repeats in _schedules(m.num_layers, s["stage"], rows,
                                             shards // s["stage"]):
                cand = Candidate(sizes, dcn, remat, g, micro, repeats, chunk)
                if analytic_memory(cfg, leaves, cand) > FAR_OVER * budget:
                    pruned["analytic memory far over budget"] += 1
                    continue
                out.append(cand)
    return out, pruned


def _schedules(layers: int, stages: int, rows: int, shards: int):
    if stages == 1:
        yield 0, 1
        return
    for micro in (stages, 2 * stages, 4 * stages):
        if rows % micro or (rows // micro) % shards:
            continue
        for repeats in (1, 2):
            if layers % (stages * repeats) == 0:
                yield micro, repeats


def _mesh_reason(cfg: Config, s: dict[str, int], cluster: Cluster, moe: bool) -> str | None:
    m, L = cfg.model, cfg.data.seq_len
    if s["expert"] > 1 and (not moe or m.num_experts % s["expert"]):
        return "expert axis without experts to split"
    if s["tensor"] > cluster.per_host or s["context"] > cluster.per_host:
        return "tensor or context would cross hosts"
    heads = math.lcm(m.num_kv_heads, s["tensor"])
    if m.num_heads % heads or m.num_heads % s["tensor"]:
        return "tensor does not divide the heads"
    width = _active_mlp(m) // max(1, getattr(m, "experts_per_token", 1)) if moe else m.mlp_dim
    if width % s["tensor"] or (m.vocab_size and m.vocab_size % s["tensor"]):
        return "tensor does not divide the MLP or vocabulary"
    if m.num_layers % s["stage"]:
        return "stage does not divide the layers"
    if s["stage"] > 1 and s["context"] > 1:  # XLA's SPMD partitioner aborts on the pair
        return "pipeline stages with context parallelism"
    if s["context"] > 1 and L % (2 * s["context"]):
        return "context does not divide the sequence"
    if m.embed_dim % s["fsdp"]:
        return "fsdp does not divide the width"
    if cfg.data.batch_size % (s["data"] * s["stage"] * s["fsdp"] * s["expert"]):
        return "batch rows do not split over the batch shards"
    return None
