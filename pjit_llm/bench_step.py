"""How fast the training step runs: the real compiled step on synthetic tokens.

The model, optimizer, shardings and step are the ones `train` compiles; only the batches are
random tokens (one document per row), so a benchmark needs no dataset, tokenizer or data
packages. Each timed step is synchronised with the device, so the figures are the step's own
time, without the training loop around it.
"""

import dataclasses
import gc
import statistics
import time

import jax
import numpy as np

from pjit_llm import perf
from pjit_llm.attention import resolve_attention
from pjit_llm.config import Config
from pjit_llm.mesh import make_mesh
from pjit_llm.model import padded_vocab
from pjit_llm.optim import make_optimizer, make_schedule
from pjit_llm.sharding import Layout, bytes_per_device, check_batch
from pjit_llm.train_step import compile_steps, init_state


def synthetic_batch(cfg: Config, layout: Layout, seed: int = 0) -> dict:
    """A global batch of random tokens, built shard by shard (each process makes its own)."""
    B, L, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(seed)
    host = {"tokens": rng.integers(0, V, (B, L), dtype=np.int32),
            "segment_ids": np.ones((B, L), np.int32),
            "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))}
    sharding = layout.sharding(("batch", "length"))
    return {k: jax.make_array_from_callback((B, L), sharding, lambda idx, v=v: v[idx])
            for k, v in host.items()}


def with_vocab(cfg: Config) -> Config:
    """model.vocab_size=0 (follow the tokenizer) made concrete: the byte tokenizer's, as
    `train` would pick it. Benchmarks load no tokenizer."""
    if cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              vocab_size=padded_vocab(257)))


def measure(cfg: Config, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    """Compile the configured train step, run `warmup` steps, then time `steps` steps (traced
    with jax.profiler into `profile_dir` when given)."""
    cfg = with_vocab(cfg)
    mesh = make_mesh(cfg.mesh)
    layout = Layout(mesh, cfg.mesh.rules)
    check_batch(layout, cfg.data.batch_size // cfg.train.grad_accum)
    model_cfg = resolve_attention(cfg.model, cfg.data.seq_len)
    schedule = make_schedule(cfg.optimizer, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    graphdef, state, shardings = init_state(model_cfg, layout, tx, cfg.train.seed)
    batch = synthetic_batch(cfg, layout)
    step_fn, _ = compile_steps(graphdef, tx, schedule, cfg.train.grad_accum, layout, shardings)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    if profile_dir:
        jax.profiler.start_trace(profile_dir)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    if profile_dir:
        jax.profiler.stop_trace()

    devices = mesh.devices.size
    tokens = cfg.data.batch_size * cfg.data.seq_len
    median = statistics.median(times)
    tflops = perf.train_flops_per_token(model_cfg, cfg.data.seq_len) * tokens / median / devices / 1e12
    peak = perf.peak_flops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    memory = perf.compiled_memory(compiled)
    device_peak = perf.device_memory_peak(jax.local_devices()[0])
    row = {
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "devices": devices, "device_kind": jax.devices()[0].device_kind,
        "attention": model_cfg.attention, "tokens_per_step": tokens,
        "step_s": median, "step_min_s": min(times), "step_max_s": max(times), "steps": steps,
        "tokens_per_s_per_device": tokens / median / devices,
        "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak if peak else None,
        # What the device allocator saw where it reports it (GPUs), else XLA's plan.
        "peak_memory": device_peak or (memory["peak"] if memory else None),
        "state_bytes_per_device": bytes_per_device(state),
        "compile_s": compile_s, "loss": float(metrics["loss"]),
    }
    del state, batch, compiled
    gc.collect()
    return row
