"""Performance accounting: model FLOPs and utilisation (MFU), and what the compiled step
costs in memory.

Training FLOPs per token are 6 x (parameters used in matrix multiplies) for the forward and
backward passes, plus the attention scores and their weighted sum under the causal mask:
6 x layers x width x sequence length, half of the full square (a flash kernel skips the
masked half; XLA's attention computes it, which counts as overhead, not as model FLOPs).
This is the usual model-FLOPs convention for MFU, so figures compare with published ones.
"""

from pjit_llm.config import ModelConfig

# Dense bfloat16 peak FLOP/s per device, by the start of jax's `device_kind`.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v4": 275e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    D, H, G, K, F, V = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.mlp_dim, cfg.vocab_size)
    per_layer = D * H * K * 2 + D * G * K * 2 + 3 * D * F
    return cfg.num_layers * per_layer + D * V  # the output projection (tied or not)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6 * matmul_params(cfg) + 6 * cfg.num_layers * cfg.embed_dim * seq_len


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for prefix, flops in PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def _memory_stats(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # some backends do not implement it
        return {}


def device_memory_limit(device) -> int | None:
    """Bytes the backend lets XLA use on `device`, where it says (GPUs and TPUs do)."""
    return _memory_stats(device).get("bytes_limit")


def device_memory_in_use(device) -> int | None:
    return _memory_stats(device).get("bytes_in_use")


def device_memory_peak(device) -> int | None:
    """The most bytes the device allocator has held at once, where the backend says."""
    return _memory_stats(device).get("peak_bytes_in_use")


def compiled_memory(compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled step: arguments, outputs, temporaries, and the peak."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def compiled_flops(compiled) -> float | None:
    """XLA's own count of FLOPs per device per step."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
