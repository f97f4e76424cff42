"""The step-time model: one screen, on purpose.

    compute     = the program's matrix-product FLOPs / (compute_share x peak)
    memory      = the bytes its kernels read and write / HBM bandwidth (less the (seq, seq)
                  attention scores on a device whose flash kernel keeps them on chip)
    collectives = sum over collectives of count x (latency + link bytes / link bandwidth),
                  the link being the host's (NVLink) or the network's when its groups
                  reach across hosts (reductions at the kind's measured reduce slowdown)
    hidden      = the collectives of parameters and gradients: all-gathers, reduce-scatters
                  and all-reduces over data and fsdp only, which the latency-hiding
                  scheduler and pipelined collectives of xla_flags.py overlap with compute
    overhead    = kernels launched x the kind's kernel overhead (measured on the CPU; 0 on
                  GPUs, whose queued launches overlap the kernels before them)
    elementwise = the kernels' elementwise operations / the kind's element rate (measured on
                  the CPU, whose vector units bound the optimizer's update and the norms as
                  much as memory does; not counted on GPUs, where memory bounds them)
    step        = max(compute, memory, hidden) + the other collectives + overhead
    serial step = compute + memory of the kernels without a matrix product + elementwise +
                  every collective + overhead, on a kind without overlap (the emulated CPU
                  devices: each kernel runs at its own bound, one after the other, and
                  collectives are copies on the same cores)
    bubble      = compute x (S-1)/(M.R+S-1), shown apart: the pipeline's idle stages compute
                  on zeros, so the compiled FLOPs already hold it

It ignores: attention kernels other than matrix products (counted as bytes only), collectives
contending for one link, the network's topology above one link per device, stragglers, the
host's dispatch of the step, the input pipeline and checkpoints.
"""

from dataclasses import dataclass

from pjit_llm.planning.devices import DeviceKind

HIDDEN_OPS = ("all-gather", "reduce-scatter", "all-reduce")
HIDDEN_AXES = {"data", "fsdp"}


@dataclass(frozen=True)
class Estimate:
    step_s: float
    terms: dict[str, float]  # seconds: compute, memory, hidden comm, blocking comm, bubble
    dominant: str


def collective_seconds(c: dict, kind: DeviceKind) -> float:
    link = kind.network_link if c["across_hosts"] else kind.host_link
    if c["op"] in ("all-reduce", "reduce-scatter"):
        link /= kind.reduce_slowdown
    return c["count"] * (kind.link_latency + c["link_bytes"] / link)


def hidden(c: dict) -> bool:
    return c["op"] in HIDDEN_OPS and set(c["axes"]) <= HIDDEN_AXES


def flash(analysis: dict, kind: DeviceKind) -> bool:
    """Whether the target runs attention as a flash kernel where the compile ran XLA's: on a
    GPU kind, without context parallelism (models/attention.py picks cuDNN then)."""
    return kind.flash_attention and analysis.get("context", 1) == 1


def estimate(analysis: dict, kind: DeviceKind) -> Estimate:
    compute = analysis["flops"] / (kind.compute_share * kind.peak_flops)
    traffic = analysis["bytes"]
    if flash(analysis, kind):
        traffic -= analysis.get("score_bytes", 0.0)
    if not kind.overlap:  # matrix-product kernels are bound by their FLOPs, counted above
        traffic -= analysis.get("dot_bytes", 0.0)
    memory = traffic / kind.hbm_bandwidth
    hide = sum(collective_seconds(c, kind) for c in analysis["collectives"] if hidden(c))
    block = sum(collective_seconds(c, kind) for c in analysis["collectives"] if not hidden(c))
    overhead = analysis.get("kernels", 0.0) * kind.kernel_overhead
    elementwise = (analysis.get("element_ops", 0.0) / kind.element_rate
                   if kind.element_rate else 0.0)
    if kind.overlap:
        step = max(compute, memory, hide) + block + overhead
    else:
        step = compute + memory + elementwise + hide + block + overhead
    bubble = compute * analysis.get("bubble", 0.0)
    terms = {"compute": compute - bubble, "memory": memory, "collectives (hidden)": hide,
             "collectives (blocking)": block, "bubble": bubble, "kernel overhead": overhead,
             "elementwise": elementwise}
    return Estimate(step, terms, max(terms, key=terms.get))
