"""The devices a plan is made for: their data-sheet figures, and the cluster they form.

Figures per device, from the vendors' data sheets (SXM/HGX parts): dense bfloat16 peak
FLOP/s, HBM size and bandwidth, the NVLink bandwidth each GPU has to the others of its host
(one direction: half the bidirectional figure NVIDIA quotes) and the network bandwidth it has
to other hosts (one 400 Gb/s NIC per GPU, 50 GB/s; 200 Gb/s on A100 systems).
`compute_share` is the share of peak the compiled step's matrix products reach: 0.5 on GPUs,
from the measured H200 rows of BENCHMARKS (the Llama-1B shape: 38.5 % MFU with every layer
recomputed, so about 51 % of peak on the FLOPs the hardware runs; 42.5 % with `proj`, about
49 %). Another kind comes from a YAML file of the same keys (`--device-file`).
"""

from dataclasses import dataclass

import yaml

from pjit_llm.errors import UserError

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class DeviceKind:
    name: str
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bytes: float  # memory per device
    hbm_bandwidth: float  # bytes/s
    host_link: float  # bytes/s each device sends to the others of its host
    network_link: float  # bytes/s each device sends to other hosts
    compute_share: float = 0.5  # of peak, reached by the compiled step's matrix products
    link_latency: float = 10e-6  # seconds each collective costs before its first byte
    overlap: bool = True  # collectives of parameters and gradients hide behind compute
    # Attention runs as a fused flash kernel (cuDNN): its (seq, seq) scores stay on chip,
    # where the emulated CPU compile, on XLA's attention, writes them to memory.
    flash_attention: bool = True
    # Seconds each kernel costs beyond its FLOPs and bytes (launch, dispatch): measured for
    # the emulated CPU devices; 0 for the data-sheet kinds, whose launches overlap the kernels
    # before them (CUDA streams queue them ahead).
    kernel_overhead: float = 0.0
    # How many times slower an all-reduce or reduce-scatter moves each link byte than an
    # all-gather (measured on the CPU, whose reductions add on the devices' shared cores).
    reduce_slowdown: float = 1.0
    # Elementwise operations per second a device computes in the kernels without a matrix
    # product (measured on the CPU, where the optimizer's update, norms and softmax are bound by
    # them as much as by memory; 0 for the data-sheet kinds, whose such kernels memory bounds).
    element_rate: float = 0.0


KINDS = {
    "h100": DeviceKind("h100", 989e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB),
    "h200": DeviceKind("h200", 989e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB),
    "a100": DeviceKind("a100", 312e12, 80 * GB, 2.039e12, 300 * GB, 25 * GB),
    "b200": DeviceKind("b200", 2250e12, 180 * GB, 8.0e12, 900 * GB, 50 * GB),
}


def load_kinds(path: str) -> dict[str, DeviceKind]:
    """Device kinds from a YAML mapping of name -> {peak_tflops, hbm_gib, hbm_tb_s,
    host_link_gb_s, network_link_gb_s[, compute_share, link_latency_us]}."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"cannot read device file {path}: {e.strerror}") from None
    except yaml.YAMLError:
        raise UserError(f"device file {path} is not valid YAML; fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"device file {path} must map device names to their figures")
    units = {"peak_tflops": ("peak_flops", 1e12), "hbm_gib": ("hbm_bytes", GIB),
             "hbm_tb_s": ("hbm_bandwidth", 1e12), "host_link_gb_s": ("host_link", GB),
             "network_link_gb_s": ("network_link", GB), "compute_share": ("compute_share", 1),
             "link_latency_us": ("link_latency", 1e-6)}
    kinds = {}
    for name, figures in raw.items():
        if not isinstance(figures, dict):
            raise UserError(f"device file {path}: {name} must map figure names to numbers")
        unknown = set(figures) - set(units)
        missing = set(list(units)[:5]) - set(figures)
        if unknown or missing:
            wrong = (f"unknown {', '.join(sorted(unknown))}" if unknown
                     else f"no {', '.join(sorted(missing))}")
            raise UserError(f"device file {path}: {name} has {wrong}; give {', '.join(units)}")
        try:
            values = {units[k][0]: float(v) * units[k][1] for k, v in figures.items()}
        except (TypeError, ValueError):
            raise UserError(f"device file {path}: {name}'s figures must be numbers") from None
        for key, value in figures.items():
            if not float(value) > 0 and key != "link_latency_us":
                raise UserError(f"device file {path}: {name}'s {key}={value} must be positive")
            if key == "compute_share" and float(value) > 1:
                raise UserError(f"device file {path}: {name}'s compute_share={value} is a share "
                                "of the peak: at most 1")
        kind = DeviceKind(str(name).lower(), **values)
        kinds[kind.name] = kind
    return kinds


@dataclass(frozen=True)
class Cluster:
    kind: DeviceKind
    devices: int
    per_host: int

    @property
    def hosts(self) -> int:
        return self.devices // self.per_host

    def describe(self) -> str:
        return (f"{self.devices} x {self.kind.name} ({self.hosts} host(s) of {self.per_host}, "
                f"{self.kind.hbm_bytes / GIB:.0f} GiB each)")


def make_cluster(kind: DeviceKind, devices: int, per_host: int) -> Cluster:
    if devices < 1 or per_host < 1:
        raise UserError("--devices and --per-host must be positive")
    per_host = min(per_host, devices)
    if devices % per_host:
        raise UserError(f"--devices {devices} is not a whole number of hosts of --per-host "
                        f"{per_host}; give a multiple of {per_host}")
    return Cluster(kind, devices, per_host)
