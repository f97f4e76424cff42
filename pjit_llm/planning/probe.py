"""The figures of the devices this process has, measured: what the step-time model needs for a
plan of the emulated CPU mesh (whose devices share the machine's cores, so no data sheet
describes them). A sharded matrix product gives the FLOP rate per device, a sharded
elementwise pass the memory bandwidth, an all-gather the link bandwidth and a tiny all-reduce
the latency of one collective. A second or two in all."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pjit_llm.planning.devices import DeviceKind


def _seconds(f, *args, repeats: int = 5) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_kind(devices: list, memory_bytes: float, name: str = "cpu") -> DeviceKind:
    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    rows = NamedSharding(mesh, P("d"))
    x = jax.device_put(jnp.ones((n * 256, 512), jnp.float32), rows)
    w = jax.device_put(jnp.ones((512, 512), jnp.float32), NamedSharding(mesh, P()))

    @jax.jit
    def products(x, w):
        for _ in range(8):
            x = jnp.tanh(x @ w)
        return x

    flops = 8 * 2 * x.shape[0] * 512 * 512 / n / _seconds(products, x, w)
    big = jax.device_put(jnp.ones((n, 2**21), jnp.float32), rows)
    bandwidth = 2 * big.nbytes / n / _seconds(jax.jit(lambda a: a * 2 + 1), big)
    gather = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))
    small = jax.device_put(jnp.ones((n, 8), jnp.float32), rows)
    latency = _seconds(jax.jit(lambda a: jnp.sum(a), out_shardings=NamedSharding(mesh, P())),
                       small)
    piece = big.nbytes / n
    link = piece * (n - 1) / max(_seconds(gather, big) - latency, 1e-6)
    return DeviceKind(name, flops, memory_bytes, bandwidth, link, link, compute_share=1.0,
                      link_latency=latency, overlap=False,
                      flash_attention=False)
