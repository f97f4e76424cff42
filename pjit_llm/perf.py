"""Performance accounting in one place: model FLOPs per step (from the model family's count),
throughput and utilisation (MFU) against the device's peak, and what a compiled step costs
in memory, and the refusal of a step that cannot fit its device.
"""

from pjit_llm.errors import UserError
from pjit_llm.metrics import human_bytes
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.families import family_of

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

# Memory bandwidth in bytes/s per device, by the start of `device_kind`; the first match wins
# (so the PCIe H100 before the SXM one).
MEMORY_BANDWIDTH = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100": 3.35e12,
    "NVIDIA A100": 2.0e12,
    "NVIDIA L4": 0.3e12,
    "TPU v5 lite": 0.82e12,
    "TPU v5p": 2.76e12,
    "TPU v4": 1.2e12,
}


def flops_per_step(cfg: DecoderConfig, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one training step over a global batch of `batch_size` x `seq_len`."""
    return family_of(cfg).train_flops_per_token(cfg, seq_len) * batch_size * seq_len


def throughput(flops: float, tokens: float, seconds: float, devices: int,
               peak: float | None) -> dict:
    """Tokens/s, TFLOP/s per device and MFU (None without a known peak) of `seconds` of
    training that did `flops` model FLOPs over `tokens` tokens on `devices` devices."""
    seconds = max(seconds, 1e-9)
    tflops = flops / seconds / devices / 1e12
    return {"tokens_per_s": tokens / seconds, "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / peak if peak else None}


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for prefix, flops in PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def memory_bandwidth(device_kind: str) -> float | None:
    """The device's memory bandwidth in bytes/s, where known (the most specific entry wins)."""
    for prefix, rate in MEMORY_BANDWIDTH.items():
        if device_kind.startswith(prefix):
            return rate
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


def check_fits(memory: dict[str, int] | None, device) -> None:
    """Refuse a compiled step whose planned peak (`compiled_memory`) exceeds what the backend
    lets XLA use on `device`: one line before anything is allocated, instead of an
    out-of-memory error from deep inside the first step. Backends that state no limit (CPU)
    are never refused."""
    limit = device_memory_limit(device)
    if memory and limit and memory["peak"] > limit:
        raise UserError(f"the train step needs {human_bytes(memory['peak'])} per device but "
                        f"the device has {human_bytes(limit)}; shard more (mesh.fsdp, "
                        "mesh.tensor), set model.remat, or lower data.batch_size")


def compiled_flops(compiled) -> float | None:
    """XLA's own count of FLOPs per device per step."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
