"""The figures of the devices this process has, measured: what the step-time model needs for a
plan of the emulated CPU mesh (whose devices share the machine's cores, so no data sheet
describes them). Every figure is a slope between two loop lengths of the same jitted program
on all devices at once, so that what a jit call itself costs (dispatch, the devices'
start-up) cancels out:

    FLOP rate      a layer-sized matrix product, per device
    bandwidth      an elementwise pass over arrays larger than the caches, per device
    element rate   a long chain of elementwise operations on an array in cache, per device
    kernel cost    one small kernel that cannot fuse with the next: what every kernel of a
                   compiled step pays on top of its FLOPs and bytes (the runtime's dispatch
                   of each kernel to eight device threads on a few cores)
    collective     a tiny all-reduce over every device: what each collective pays before its
                   first byte (the devices meet at a rendezvous)
    link           an all-gather of 1 MiB less that latency, per byte each device receives
    reductions     an all-reduce of 1 MiB likewise: how much slower than the gather each of
                   its link bytes is (XLA:CPU sums on the devices' threads; NCCL's ring does not
                   differ, so 1 for the data-sheet kinds)

Each is the median of several repeats (the machine is shared). A few seconds in all."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pjit_llm.planning.devices import DeviceKind

REPEATS = 7
COLLECTIVE_FLOATS = 2**18  # each device's output of the probe's collectives


def _seconds(f, *args, repeats: int = REPEATS) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _per_iteration(make, x, short: int, long: int) -> float:
    """Seconds one iteration of `make(n)`'s loop adds: the slope between two loop lengths."""
    a, b = jax.jit(make(short)), jax.jit(make(long))
    return max((_seconds(b, x) - _seconds(a, x)) / (long - short), 1e-9)


def measure_kind(devices: list, memory_bytes: float, name: str = "cpu") -> DeviceKind:
    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    rows = NamedSharding(mesh, P("d"))

    def loop(body):
        return lambda k: (lambda x: jax.lax.fori_loop(0, k, lambda i, y: body(y), x))

    w = jnp.full((256, 256), 1 / 256, jnp.float32)
    x = jax.device_put(jnp.ones((n * 256, 256), jnp.float32), rows)
    flops = 2 * 256 * 256 * 256 / _per_iteration(loop(lambda y: y @ w), x, 2, 18)

    big = jax.device_put(jnp.ones((n, 2**21), jnp.float32), rows)  # 8 MiB a device
    bandwidth = 2 * big.nbytes / n / _per_iteration(loop(lambda y: y * 0.5 + 1), big, 1, 9)

    # A long chain of elementwise operations on an array in cache: one fusion bound by
    # arithmetic, not memory.
    chain = 16

    def arithmetic(y):
        for _ in range(chain):
            y = y * 0.999 + 0.001
        return y
    cached = jax.device_put(jnp.ones((n, 2**14), jnp.float32), rows)  # 64 KiB a device
    element_rate = 2 * chain * 2**14 / _per_iteration(loop(arithmetic), cached, 4, 24)

    small = jax.device_put(jnp.ones((n, 64), jnp.float32), rows)
    # A reduction then a broadcast: two kernels an iteration that no fusion joins.
    kernel = _per_iteration(loop(lambda y: y - jnp.max(y, axis=1, keepdims=True)), small,
                            10, 110) / 2
    if n == 1:  # no collective to time, and none in a one-device program
        return DeviceKind(name, flops, memory_bytes, bandwidth, math.inf, math.inf,
                          compute_share=1.0, link_latency=0.0, overlap=False,
                          flash_attention=False, kernel_overhead=kernel,
                          element_rate=element_rate)

    def psum(y):
        total = jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"),
                              out_specs=P("d"))(y)
        return total * 1e-3
    latency = _per_iteration(loop(psum), small, 4, 24)

    # Collectives of about a layer's weights (1 MiB out): larger ones are not what a step
    # moves, and their fresh output pages cost more than the copy.
    piece = jax.device_put(jnp.ones((n, COLLECTIVE_FLOATS // n), jnp.float32), rows)

    def gather(y):
        whole = jax.shard_map(lambda v: jax.lax.all_gather(v, "d", tiled=True), mesh=mesh,
                              in_specs=P("d"), out_specs=P(), check_vma=False)(y)
        return y + whole[:, :1] * 1e-3
    per_gather = _per_iteration(loop(gather), piece, 2, 12)
    link = piece.nbytes * (n - 1) / n / max(per_gather - latency - kernel, 1e-9)

    def reduce(y):  # the same bytes summed over every device: 2 (n-1)/n of them on the link
        whole = jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P(),
                              out_specs=P(), check_vma=False)(y)
        return whole * 0.5
    replicated = jax.device_put(jnp.ones((COLLECTIVE_FLOATS,), jnp.float32),
                                NamedSharding(mesh, P()))
    per_reduce = _per_iteration(loop(reduce), replicated, 2, 12)
    reduce_link = 2 * replicated.nbytes * (n - 1) / n / max(per_reduce - latency - kernel, 1e-9)
    return DeviceKind(name, flops, memory_bytes, bandwidth, link, link, compute_share=1.0,
                      link_latency=latency, overlap=False, flash_attention=False,
                      kernel_overhead=kernel, reduce_slowdown=max(1.0, link / reduce_link),
                      element_rate=element_rate)
