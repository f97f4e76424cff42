"""`python -m pjit_llm.train [--config FILE] [--emulate-devices N] [key.sub=value ...]`

Builds everything from the config, then runs the loop: dispatch steps without waiting, read
metrics one step late at log intervals, evaluate on held-out data, write the run directory.
"""

import argparse
import collections
import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from pjit_llm import distributed, perf, xla_flags
from pjit_llm.attention import resolve_attention
from pjit_llm.checkpoint import FIXED_FIELDS, Checkpoints, checkpoint_dir
from pjit_llm.config import Config, load_config
from pjit_llm.data.loader import Loader, eval_batches
from pjit_llm.data.sources import Dataset, prepare_shared
from pjit_llm.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from pjit_llm.errors import UserError, run_cli
from pjit_llm.evaluate import evaluate
from pjit_llm.export import restore_params, run_config
from pjit_llm.generate import Generator, Sampling
from pjit_llm.mesh import describe, make_mesh, use_emulated_devices
from pjit_llm.metrics import MetricsLog, human_bytes, human_count, info
from pjit_llm.model import padded_vocab
from pjit_llm.optim import make_optimizer, make_schedule
from pjit_llm.preemption import MAX_IN_FLIGHT, StopRequest
from pjit_llm.sharding import Layout, bytes_per_device, check_batch
from pjit_llm.train_step import TrainState, compile_steps, init_state, plan_state


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file (default: the built-in tiny CPU config)")
    p.add_argument("--emulate-devices", type=int, default=0, metavar="N",
                   help="train on N emulated CPU devices (sets mesh.emulate_devices)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_intermixed_args(argv)


def resolve(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fill values that follow from other parts: the vocabulary follows the tokenizer."""
    vocab = cfg.model.vocab_size or padded_vocab(tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} tokens; raise it or set 0 to follow the tokenizer")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def main(argv=None) -> None:
    xla_flags.apply_defaults()
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.emulate_devices:
        overrides.append(f"mesh.emulate_devices={args.emulate_devices}")
    cfg = load_config(args.config, overrides)
    use_emulated_devices(cfg.mesh.emulate_devices)
    topology = distributed.initialize(cfg.distributed)
    try:
        info(distributed.describe(topology))
        dataset = prepare_shared(cfg.data)
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path, dataset.directory)
        cfg = resolve(cfg, tokenizer)
        train(cfg, dataset, tokenizer)
    finally:
        distributed.shutdown()  # train() has closed the checkpoints and the data


def train(cfg: Config, dataset: Dataset, tokenizer: Tokenizer) -> dict:
    """Run (or resume) the configured training; returns the last logged metrics."""
    mesh = make_mesh(cfg.mesh)
    layout = Layout(mesh, cfg.mesh.rules)
    check_batch(layout, cfg.data.batch_size // cfg.train.grad_accum)
    schedule = make_schedule(cfg.optimizer, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    # The run directory records the attention setting as asked (auto); the kernel is chosen here.
    model_cfg = resolve_attention(cfg.model, cfg.data.seq_len)
    graphdef, abstract_state, shardings = plan_state(model_cfg, layout, tx)
    train_step, eval_step = compile_steps(graphdef, tx, schedule, cfg.train.grad_accum, layout,
                                          shardings, skip_nonfinite=cfg.train.max_bad_steps > 0)
    batch_sharding = layout.sharding(("batch", "length"))
    val_batches = eval_batches(dataset, tokenizer, cfg.data, batch_sharding, cfg.train.eval_batches)

    if cfg.train.init_from and not checkpoint_dir(cfg).is_dir():
        _init_source(cfg)  # a new run: refuse a mismatch before creating any directory
    ckpts = Checkpoints(checkpoint_dir(cfg), cfg.checkpoint)
    loader = Loader(dataset, tokenizer, cfg.data, batch_sharding)
    try:
        state = _resume_or_init(cfg, ckpts, loader, abstract_state, layout, tx)
        run_dir = Path(cfg.train.run_dir)
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        info(describe(mesh))
        info(f"model {human_count(n_params)} parameters; per device: params "
             f"{human_bytes(bytes_per_device(state.params))}, optimizer state "
             f"{human_bytes(bytes_per_device(state.opt_state))}")
        info(f"data: {len(dataset.train):,} train / {len(dataset.val):,} validation records in "
             f"{dataset.directory}; {type(tokenizer).__name__} of {tokenizer.vocab_size} tokens; "
             f"global batch {cfg.data.batch_size} x {cfg.data.seq_len}")
        log = MetricsLog(run_dir, append=int(state.step) > 0, total_steps=cfg.train.steps,
                         first_step=int(state.step))
        generator = Generator(graphdef, cfg.model, layout, Sampling())  # compiled once, reused

        def run_eval(params, step):
            result = evaluate(eval_step, params, val_batches, isinstance(tokenizer, ByteTokenizer))
            log.write({"step": step, **result})
            if cfg.train.sample_tokens and cfg.train.sample_prompts:
                write_samples(cfg, generator, params, tokenizer, log, step)
            return result

        try:
            with StopRequest() as stop:
                return _loop(cfg, state, train_step, run_eval, loader, log, ckpts, stop)
        finally:
            log.close()
    finally:
        ckpts.close()  # waits for a save in flight: nothing is left half-written
        loader.close()


def write_samples(cfg: Config, generator: Generator, params, tokenizer, log: MetricsLog,
                  step: int) -> None:
    """Greedy continuations of the fixed prompts: to the console and TensorBoard's text tab."""
    prompts = list(cfg.train.sample_prompts)
    new = min(cfg.train.sample_tokens, cfg.model.max_len - max(len(tokenizer.encode(p)) for p in prompts))
    if new < 1:
        return
    out = generator.generate(params, [tokenizer.encode(p) for p in prompts], new, tokenizer.eos_id)
    for i, (prompt, ids) in enumerate(zip(prompts, out)):
        text = prompt + tokenizer.decode(ids)
        info(f"sample {i} at step {step}: {text!r}")
        log.text(f"samples/{i}", text, step)


def report_compiled(compiled, seconds: float, model_flops: float) -> None:
    """Print the compiled step's per-device memory and FLOPs; refuse a step that cannot fit."""
    memory, flops = perf.compiled_memory(compiled), perf.compiled_flops(compiled)
    parts = [f"compiled the train step in {seconds:.1f}s",
             f"model {model_flops / 1e9:,.1f} GFLOP per step"]
    if memory:
        parts.append(f"per device {human_bytes(memory['peak'])} (arguments "
                     f"{human_bytes(memory['arguments'])}, temporaries "
                     f"{human_bytes(memory['temporaries'])})")
    if flops:
        # XLA counts a scanned loop's body once, so with scan_layers this is per layer.
        parts.append(f"XLA's cost analysis {flops / 1e9:,.1f} GFLOP per device")
    info("; ".join(parts))
    limit = perf.device_memory_limit(jax.devices()[0])
    if memory and limit and memory["peak"] > limit:
        raise UserError(f"the train step needs {human_bytes(memory['peak'])} per device but "
                        f"the device has {human_bytes(limit)}; shard more (mesh.fsdp, "
                        "mesh.tensor), set model.remat, or lower data.batch_size")


def _resume_or_init(cfg: Config, ckpts: Checkpoints, loader: Loader, abstract_state, layout, tx):
    """The latest readable checkpoint (state and data position), or a fresh state."""
    latest = ckpts.latest_step()
    if latest is None and cfg.train.init_from:
        return _init_from(cfg, abstract_state, layout, tx)
    if latest is None:
        return init_state(cfg.model, layout, tx, cfg.train.seed)[1]
    if not cfg.train.resume:
        raise UserError(f"{ckpts.directory} already holds checkpoints (latest step {latest}); "
                        "set train.resume=true to continue that run or choose another train.run_dir")
    restored = ckpts.restore(abstract_state, loader, cfg)
    if restored is None:
        raise UserError(f"no readable checkpoint is left in {ckpts.directory} (unreadable ones "
                        "were moved aside); choose another train.run_dir to start afresh")
    state, step = restored
    info(f"resumed from step {step} of {ckpts.directory}")
    return state


# Model fields that must agree with train.init_from's: they fix parameter shapes or the
# function the parameters compute. Dtypes, remat, scanning and max_len may differ.
INIT_FIELDS = FIXED_FIELDS["model"] + ("norm_eps", "rope_theta", "rope_scaling", "rope_factor",
                                       "rope_low_freq_factor", "rope_high_freq_factor",
                                       "rope_original_max_len")


def _init_source(cfg: Config) -> Config:
    """The config of train.init_from's run directory, refused unless its model matches."""
    source = Path(cfg.train.init_from).absolute()
    if not source.is_dir():
        raise UserError(f"train.init_from={cfg.train.init_from} is not a directory; give a run "
                        "directory (one written by training or by pjit_llm.convert import)")
    src = run_config(source)
    for name in INIT_FIELDS:
        theirs, ours = getattr(src.model, name), getattr(cfg.model, name)
        if theirs != ours:
            raise UserError(f"train.init_from={cfg.train.init_from} has model.{name}={theirs!r} "
                            f"but this run has {ours!r}; set model.{name}={theirs} (or start "
                            f"from --config {source / 'config.yaml'})")
    return src


def _init_from(cfg: Config, abstract_state, layout: Layout, tx) -> TrainState:
    """Step 0 of a new run with the parameters of another run directory (its latest
    checkpoint, or an imported model), restored straight into this mesh's shardings, and
    a fresh optimizer state."""
    source = Path(cfg.train.init_from).absolute()
    params, step = restore_params(_init_source(cfg), layout, None)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    dtype = cfg.model.param_dtype

    def start(params):
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    state = jax.jit(start, out_shardings=shardings)(params)
    info(f"initialised the parameters from {source} (step {step}); fresh optimizer state")
    return state


def _loop(cfg: Config, state, train_step, run_eval, loader: Loader, log: MetricsLog,
          ckpts: Checkpoints, stop: StopRequest) -> dict:
    """Dispatch steps ahead of reading their metrics; read them at log intervals, before
    saving (so a non-finite state is never saved) and when stopping."""
    first = int(state.step)
    if first >= cfg.train.steps:
        info(f"nothing to do: the run is at step {first} of train.steps={cfg.train.steps}")
        return {}
    batch = next(loader)
    compile_start = time.perf_counter()
    train_step = train_step.lower(state, batch).compile()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_step = perf.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    report_compiled(train_step, time.perf_counter() - compile_start, flops_per_step)

    devices = jax.device_count()
    peak = perf.peak_flops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    # XLA:CPU collectives deadlock with too many steps in flight; across processes the bound
    # also keeps the host loops within a few steps of each other (see preemption.py).
    bounded = jax.default_backend() == "cpu" or jax.process_count() > 1
    in_flight = collections.deque()
    unread = []  # (step, device metrics) not yet read on the host
    bad_steps = 0
    last = {}
    start = time.perf_counter()
    mark = (first, start)

    def read_metrics(log_it: bool):
        """Pull the unread metrics to the host, stop on non-finite losses, log a line."""
        nonlocal mark, bad_steps, unread
        if not unread:
            return
        steps, host = [s for s, _ in unread], jax.device_get([m for _, m in unread])
        unread = []
        finite = [math.isfinite(float(m["loss"])) for m in host]
        bad_steps += finite.count(False)
        if bad_steps > cfg.train.max_bad_steps:
            bad = steps[finite.index(False)]
            kept = ckpts.latest_step()
            raise UserError(f"the training loss was not finite at step {bad}; "
                            + (f"the last good checkpoint is step {kept} in {ckpts.directory}; "
                               if kept is not None else "")
                            + "lower optimizer.lr, raise optimizer.warmup_steps, or allow "
                            "skipping with train.max_bad_steps")
        if not log_it:
            return
        now = time.perf_counter()
        good = [m for m, ok in zip(host, finite) if ok] or host
        seconds = max(now - mark[1], 1e-9)
        steps_done = steps[-1] - mark[0]
        tflops = steps_done * flops_per_step / seconds / devices / 1e12
        record = {"step": steps[-1], "loss": sum(float(m["loss"]) for m in good) / len(good),
                  "grad_norm": float(host[-1]["grad_norm"]), "lr": float(host[-1]["lr"]),
                  "tokens_per_s": steps_done * tokens_per_step / seconds,
                  "step_s": seconds / max(steps_done, 1),
                  "tflops_per_device": tflops, "elapsed_s": now - start}
        if peak:
            record["mfu"] = tflops * 1e12 / peak
        in_use = perf.device_memory_in_use(jax.local_devices()[0])
        if in_use is not None:
            record["memory_gib"] = in_use / 2**30
        if bad_steps:
            record["skipped_steps"] = bad_steps
        mark = (steps[-1], now)
        log.write(record)
        last.update(record)

    def evaluate_at(step):
        nonlocal mark
        last.update(run_eval(state.params, step))
        mark = (step, time.perf_counter())  # evaluation time is not training throughput

    if first == 0:  # the starting point: a fresh model knows next to nothing
        evaluate_at(0)
    log_due = False
    profile, tracing = cfg.train.profile_steps, False
    for step in range(first, cfg.train.steps):
        done = step + 1
        if profile and done == profile[0]:
            jax.profiler.start_trace(str(Path(cfg.train.run_dir) / "profile"))
            tracing = True
        state, metrics = train_step(state, batch)
        if tracing and done == profile[1]:
            tracing = False
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            info(f"wrote a profile of steps {profile[0]}-{profile[1]} to "
                 f"{Path(cfg.train.run_dir) / 'profile'} (TensorBoard's profile tab or Perfetto)")
        if log_due:  # the device is busy with this step while the host reads the last ones
            read_metrics(log_it=True)
            log_due = False
        unread.append((done, metrics))
        if bounded:
            in_flight.append(metrics)
            if len(in_flight) > MAX_IN_FLIGHT:
                jax.block_until_ready(in_flight.popleft())
        stopping = stop.stop_after(done)
        final = done == cfg.train.steps or stopping
        log_due = done % cfg.train.log_every == 0 or final
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps:
            read_metrics(log_it=log_due)
            log_due = False
            evaluate_at(done)
        if final or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            read_metrics(log_it=log_due)
            log_due = False
            ckpts.save(done, state, loader.get_state(), cfg)
        if stopping:
            ckpts.wait()
            info(f"stopped by {stop.signal_name} after step {done}; checkpoint saved in "
                 f"{ckpts.directory}; run the same command again to resume")
            return last
        if done < cfg.train.steps:
            batch = next(loader)  # the host prepares the next batch while the device computes
    read_metrics(log_it=log_due)
    info(f"done: step {cfg.train.steps} after {time.perf_counter() - start:.1f}s; "
         f"run directory {cfg.train.run_dir}")
    return last


if __name__ == "__main__":
    run_cli(main)
