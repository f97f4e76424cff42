"""What the training benchmarks (pjit_llm.bench step, memory, data, save) measure, as rows.

`measure`: the real compiled training step on synthetic tokens. The model, optimizer,
shardings and step are the ones `train` compiles; only the batches are random tokens (packed
documents of random lengths), so it needs no dataset, tokenizer or data packages. Each timed step is
synchronised with the device, so the figures are the step's own time, without the loop.
`data_throughput`: tokens per second from the input pipeline. `save_times`: how long a
checkpoint save holds the training loop.
"""

import dataclasses
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from pjit_llm import perf
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.config import CheckpointConfig, Config
from pjit_llm.data.datasets import open_data
from pjit_llm.data.mixture import Mixture, mixed_batches
from pjit_llm.data.pipeline import packed_batches
from pjit_llm.parallel.layout import Layout, bytes_per_device
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.training.build import Components, build
from pjit_llm.training.step import trainable


def synthetic_batch(cfg: Config, layout: Layout, seed: int = 0) -> dict:
    """A global batch of random tokens packed as documents of random lengths (exponential,
    a quarter of a row on average, as web text packs into long rows), so that the segment
    mask costs what it costs on real data. Built shard by shard (each process makes its own).
    The tokens are real ones: never the ids that pad the vocabulary, whose logits the loss
    masks out (a target there would make the loss infinite)."""
    B, L, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.true_vocab
    rng = np.random.default_rng(seed)
    segment_ids = np.empty((B, L), np.int32)
    positions = np.empty((B, L), np.int32)
    for row in range(B):
        start, document = 0, 1
        while start < L:
            end = min(L, start + max(1, int(rng.exponential(L / 4))))
            segment_ids[row, start:end] = document
            positions[row, start:end] = np.arange(end - start)
            start, document = end, document + 1
    host = {"tokens": rng.integers(0, V, (B, L), dtype=np.int32),
            "segment_ids": segment_ids, "positions": positions}
    sharding = layout.sharding(("batch", "length"))
    return {k: jax.make_array_from_callback((B, L), sharding, lambda idx, v=v: v[idx])
            for k, v in host.items()}


def abstract_batch(parts: Components) -> dict:
    """The synthetic batch's shapes, dtypes and sharding, for compiling before making one."""
    B, L = parts.cfg.data.batch_size, parts.cfg.data.seq_len
    return {k: jax.ShapeDtypeStruct((B, L), np.int32, sharding=parts.batch_sharding)
            for k in ("tokens", "segment_ids", "positions")}


def measure(cfg: Config, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    """Compile the configured train step, run `warmup` steps, then time `steps` steps (traced
    with jax.profiler into `profile_dir` when given). The step is compiled for the abstract
    state, so that one that cannot fit the device is refused (as training refuses it) before
    the state takes its memory."""
    parts = build(cfg)
    cfg = parts.cfg
    start = time.perf_counter()
    compiled = parts.train_step.lower(parts.abstract_state, abstract_batch(parts)).compile()
    compile_s = time.perf_counter() - start
    memory = perf.compiled_memory(compiled)
    perf.check_fits(memory, jax.local_devices()[0])
    state = parts.init_state()
    batch = synthetic_batch(cfg, parts.layout)

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

    devices = parts.mesh.devices.size
    tokens = parts.tokens_per_step
    median = statistics.median(times)
    peak = perf.peak_flops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    rates = perf.throughput(parts.flops_per_step, tokens, median, devices, peak)
    device_peak = perf.device_memory_peak(jax.local_devices()[0])
    pipeline = parts.pipeline
    row = {
        "params": sum(x.size for x in jax.tree.leaves(trainable(state.params))),
        "devices": devices, "device_kind": jax.devices()[0].device_kind,
        "attention": parts.model.attention, "tokens_per_step": tokens,
        "step_s": median, "step_min_s": min(times), "step_max_s": max(times), "steps": steps,
        "tokens_per_s_per_device": rates["tokens_per_s"] / devices,
        "tflops_per_device": rates["tflops_per_device"], "mfu": rates["mfu"],
        # What the device allocator saw where it reports it (GPUs), else XLA's plan.
        "peak_memory": device_peak or (memory["peak"] if memory else None),
        "planned_memory": memory["peak"] if memory else None,  # XLA's plan of the step
        "state_bytes_per_device": bytes_per_device(state),
        "compile_s": compile_s, "loss": float(metrics["loss"]),
        "stages": pipeline.stages if pipeline else 1,
        "microbatches": pipeline.microbatches if pipeline else 0,
        "repeats": pipeline.repeats if pipeline else 0,
        "bubble": pipeline.bubble if pipeline else 0.0,  # the schedule's idle share, (S-1)/(MR+S-1)
    }
    del state, batch, compiled
    gc.collect()
    return row


def step_memory(cfg: Config) -> dict:
    """XLA's per-device memory plan of the configured train step, compiled for abstract state
    and batch: nothing is allocated or run, so a step far too big for this machine still
    reports what it would need. A mesh whose sizes are all given (no -1) spans that many of
    the devices, so rows on 1, 2, 4 and 8 devices compare in one process."""
    sizes = cfg.mesh.shape
    parts = build(cfg, devices=None if -1 in sizes else jax.devices()[:math.prod(sizes)])
    B, L = parts.cfg.data.batch_size, parts.cfg.data.seq_len
    start = time.perf_counter()
    compiled = parts.train_step.lower(parts.abstract_state, abstract_batch(parts)).compile()
    compile_s = time.perf_counter() - start
    memory = perf.compiled_memory(compiled) or {}
    mesh = parts.mesh.shape
    row = {"devices": parts.mesh.devices.size, "seq_len": L, "batch": B,
           "mesh": " x ".join(f"{a}={n}" for a, n in mesh.items() if n > 1) or "1 device",
           "load_balance": parts.balance > 0, "compile_s": compile_s,
           **{k: memory.get(k) for k in ("arguments", "outputs", "temporaries", "peak")}}
    del compiled
    gc.collect()
    return row


def data_throughput(dataset, tokenizer, cfg, workers: int, batches: int, warmup: int) -> float:
    """Tokens per second (padding excluded) the pipeline delivers with `workers` worker
    processes, over `batches` batches after `warmup` batches (which cover starting them)."""
    if isinstance(dataset, Mixture):
        pipeline = mixed_batches(dataset, tokenizer, cfg, cfg.batch_size, 0, 1, workers)
    else:
        pipeline = packed_batches(dataset.train, tokenizer, dataset.text_field, cfg,
                                  cfg.batch_size, 0, 1, train=True, num_workers=workers)
    it = iter(pipeline)
    try:
        for _ in range(warmup):
            next(it)
        start, tokens = time.perf_counter(), 0
        for _ in range(batches):
            tokens += int((next(it)["segment_ids"] > 0).sum())
        return tokens / (time.perf_counter() - start)
    finally:
        if hasattr(it, "close"):
            it.close()


def save_times(parts: Components, directory: Path, async_save: bool, repeats: int) -> dict:
    """Median seconds a checkpoint save of a fresh state holds the loop, and until written."""
    state = parts.init_state(seed=0)
    ckpts = Checkpoints(directory, CheckpointConfig(async_save=async_save, keep=2))
    blocked, total = [], []
    try:
        for i in range(repeats):
            start = time.perf_counter()
            ckpts.save(i + 1, state, {}, parts.cfg)
            blocked.append(time.perf_counter() - start)
            ckpts.wait()
            total.append(time.perf_counter() - start)
    finally:
        ckpts.close()
    return {"params": sum(x.size for x in jax.tree.leaves(trainable(state.params))),
            "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "mode": "async" if async_save else "sync", "blocked_s": statistics.median(blocked),
            "write_s": statistics.median(total), "repeats": repeats}


Variants = list[tuple[str, Config]]  # (name, config) of each row; "" names the base


def step_rows(variants: Variants, steps: int, warmup: int, repeats: int,
              profile: str | None = None) -> list[dict]:
    """`measure` for each variant, `repeats` times each (the first traced into
    PROFILE/row<i> when `profile` is given)."""
    rows = []
    for i, (name, cfg) in enumerate(variants):
        for r in range(repeats):
            trace = str(Path(profile, f"row{i}")) if profile and r == 0 else None
            rows.append({"variant": name or "base", **measure(cfg, steps, warmup, trace)})
    return rows


def memory_rows(variants: Variants, cap_gib: float = 0.0, max_seq: int = 2**20) -> list[dict]:
    """`step_memory` for each variant; with `cap_gib`, also the longest sequence (doubling
    data.seq_len) whose step plans to fit that many GiB per device."""
    rows = []
    for name, cfg in variants:
        use_emulated_devices(cfg.mesh.emulate_devices)
        row = {"variant": name or "base", **step_memory(cfg)}
        if cap_gib:
            cap, fits, seq = cap_gib * 2**30, None, cfg.data.seq_len
            while seq <= max_seq:
                data = dataclasses.replace(cfg.data, seq_len=seq)
                model = dataclasses.replace(cfg.model, max_len=max(cfg.model.max_len, seq))
                if step_memory(dataclasses.replace(cfg, data=data, model=model))["peak"] > cap:
                    break
                fits, seq = seq, seq * 2
            row.update(cap_gib=cap_gib, longest_seq=fits)
        rows.append(row)
    return rows


def data_rows(cfg: Config, workers: list[int], batches: int, warmup: int,
              repeats: int) -> list[dict]:
    """`data_throughput` of the configured data for each worker count: median, min, max."""
    dataset, tokenizer = open_data(cfg.data)
    source = f"mixture of {len(cfg.data.mixture)}" if cfg.data.mixture else cfg.data.source
    rows = []
    for n in workers:
        rates = [data_throughput(dataset, tokenizer, cfg.data, n, batches, warmup)
                 for _ in range(repeats)]
        gc.collect()
        rows.append({"source": source, "format": cfg.data.format, "tokenizer": cfg.data.tokenizer,
                     "workers": n, "batch": f"{cfg.data.batch_size}x{cfg.data.seq_len}",
                     "tokens_per_s": statistics.median(rates),
                     "min": min(rates), "max": max(rates), "repeats": len(rates)})
    return rows


def save_rows(cfg: Config, repeats: int, directory: str | None = None) -> list[dict]:
    """`save_times`, asynchronous then synchronous, in a temporary directory in `directory`."""
    parts = build(cfg)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        return [save_times(parts, Path(tmp, mode), mode == "async", repeats)
                for mode in ("async", "sync")]
