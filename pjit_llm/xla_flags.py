"""The XLA flags our GPU runs want, set in one place before JAX starts a backend.

XLA reads XLA_FLAGS once, when the first backend initialises, so entry points call
`apply_defaults()` before anything touches a device. A flag the user already put in
XLA_FLAGS wins over ours; PJIT_LLM_XLA_DEFAULTS=0 turns the defaults off altogether. The flags
are GPU-only: the CPU and TPU backends parse and ignore them. Every name here was checked
against the flag tables of jaxlib 0.10.2 and 0.11.2 (XLA aborts on an unknown flag).
"""

import os

GPU_DEFAULTS: dict[str, str] = {
    # Schedule collectives (FSDP all-gathers, gradient reduce-scatters) to overlap compute.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Few large collectives instead of one per parameter: NCCL's bandwidth wants big messages.
    "xla_gpu_all_gather_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 30),
    # Move the next layer's all-gather (and this layer's reduce-scatter) out of the scanned
    # layer loop's critical path; double buffering unrolls the loop by two so they can overlap.
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
}


def merged_flags(current: str, defaults: dict[str, str] = GPU_DEFAULTS) -> str:
    """`current` XLA_FLAGS plus each default whose flag it does not already set."""
    given = {part.lstrip("-").split("=", 1)[0] for part in current.split()}
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in given]
    return " ".join([current.strip(), *extra]).strip()


def beyond_defaults(current: str, defaults: dict[str, str] = GPU_DEFAULTS) -> str:
    """The flags of `current` other than our defaults as `merged_flags` adds them: the ones a
    user chose."""
    ours = {f"--{name}={value}" for name, value in defaults.items()}
    return " ".join(part for part in current.split() if part not in ours)


def apply_defaults(environ=os.environ) -> None:
    if environ.get("PJIT_LLM_XLA_DEFAULTS", "1") == "0":
        return
    environ["XLA_FLAGS"] = merged_flags(environ.get("XLA_FLAGS", ""))
