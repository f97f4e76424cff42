"""Training a configured run: build, resume or initialise, then the loop.

The loop dispatches steps without waiting on the device and calls the periodic actions
(actions.py) at their steps: metrics are read one step late at log intervals, evaluation and
samples at eval_every, checkpoints at checkpoint.every, a profile over profile_steps, and a
stop request (SIGTERM/SIGINT, or another process's) ends the run after a save.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from pjit_llm import perf
from pjit_llm.checkpoint.manager import FIXED_FIELDS, Checkpoints
from pjit_llm.checkpoint.run_dir import (CONFIG_FILE, PROFILE_DIR, checkpoint_dir, run_config,
                                         write_config)
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.config import Config, config_from_dict
from pjit_llm.data.loader import Loader, eval_batches
from pjit_llm.data.sources import Dataset
from pjit_llm.data.tokenizer import ByteTokenizer, Tokenizer
from pjit_llm.errors import UserError
from pjit_llm.metrics import MetricsLog, WandbRun, human_bytes, human_count, info
from pjit_llm.models.fp8_state import split_histories
from pjit_llm.parallel.layout import bytes_per_device
from pjit_llm.parallel.mesh import describe
from pjit_llm.training.actions import (Evaluation, InFlight, MetricsReader, Profiler,
                                       sample_generator)
from pjit_llm.training.build import Components, build
from pjit_llm.training.histories import fitted, readable, saved_shapes
from pjit_llm.training.optim import schedule_change
from pjit_llm.training.preemption import StopRequest
from pjit_llm.training.step import TrainState, trainable


def train(cfg: Config, dataset: Dataset, tokenizer: Tokenizer) -> dict:
    """Run (or resume) the configured training; returns the last logged metrics."""
    parts = build(cfg, tokenizer.vocab_size)
    cfg = parts.cfg
    val_batches = eval_batches(dataset, tokenizer, cfg.data, parts.batch_sharding,
                               cfg.train.eval_batches)
    if cfg.train.init_from and not checkpoint_dir(cfg).is_dir():
        _init_source(cfg)  # a new run: refuse a mismatch before creating any directory
    ckpts = Checkpoints(checkpoint_dir(cfg), cfg.checkpoint)
    loader = Loader(dataset, tokenizer, cfg.data, parts.batch_sharding)
    try:
        latest = ckpts.latest_step()
        # Compiled for the state's and the batches' shapes before either exists, so that a
        # step that cannot fit the device is refused before the state takes its memory.
        train_step = compile_step(parts, loader) if (latest or 0) < cfg.train.steps else None
        state = _resume_or_init(parts, ckpts, loader)
        run_dir = Path(cfg.train.run_dir)
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, cfg)
        n_params = sum(x.size for x in jax.tree.leaves(trainable(state.params)))
        info(describe(parts.mesh))
        if parts.pipeline:
            info(parts.pipeline.describe())
        info(f"model {human_count(n_params)} parameters; per device: params "
             f"{human_bytes(bytes_per_device(state.params))}, optimizer state "
             f"{human_bytes(bytes_per_device(state.opt_state))}")
        info(f"data: {len(dataset.train):,} train / {len(dataset.val):,} validation records in "
             f"{dataset.directory}; {type(tokenizer).__name__} of {tokenizer.vocab_size} tokens; "
             f"global batch {cfg.data.batch_size} x {cfg.data.seq_len}")
        if getattr(dataset, "parts", None):  # a mixture
            info("mixture: " + "; ".join(f"{p.tag} weight {p.weight:g} ({len(p.dataset.train):,} "
                                         "records)" for p in dataset.parts))
        resumed = int(state.step) > 0
        wandb = (WandbRun(run_dir, cfg.train.wandb_project, cfg.train.wandb_mode, cfg.to_dict(),
                          resume=resumed)
                 if cfg.train.wandb_project and jax.process_index() == 0 else None)
        log = MetricsLog(run_dir, append=resumed, total_steps=cfg.train.steps,
                         first_step=int(state.step), wandb=wandb)
        sampled = cfg.train.sample_tokens and cfg.train.sample_prompts
        generator = sample_generator(cfg, parts.layout) if sampled else None
        evaluation = Evaluation(cfg, parts.eval_step, val_batches, tokenizer, log, generator,
                                isinstance(tokenizer, ByteTokenizer), parts.to_model_order)
        try:
            with StopRequest() as stop:
                result = run_loop(parts, state, loader, log, evaluation, ckpts, stop,
                                  train_step)
        except BaseException:
            log.close(quietly=True)  # the run's own error is the one to report
            raise
        log.close()
        return result
    finally:
        ckpts.close()  # waits for a save in flight: nothing is left half-written
        loader.close()


def run_loop(parts: Components, state: TrainState, loader, log: MetricsLog,
             evaluation: Evaluation, ckpts: Checkpoints, stop: StopRequest,
             train_step=None) -> dict:
    """Steps from the state's step to train.steps, with the periodic actions at theirs;
    `train_step` compiled by `compile_step` (compiled here when not given)."""
    cfg = parts.cfg
    first, total = int(state.step), cfg.train.steps
    if first >= total:
        info(f"nothing to do: the run is at step {first} of train.steps={total}")
        return {}
    if train_step is None:
        train_step = compile_step(parts, loader)
    batch = next(loader)

    reader = MetricsReader(cfg, log, parts.flops_per_step, parts.tokens_per_step, first, ckpts)
    in_flight = InFlight(jax.default_backend() == "cpu" or jax.process_count() > 1)
    profiler = Profiler(cfg.train.profile_steps, Path(cfg.train.run_dir) / PROFILE_DIR)

    def evaluate_at(step: int) -> None:
        reader.last.update(evaluation(state.params, step))
        reader.restart_clock(step)

    if first == 0:  # the starting point: a fresh model knows next to nothing
        evaluate_at(0)
    log_due = False
    for done in range(first + 1, total + 1):
        profiler.before(done)
        state, metrics = train_step(state, batch)
        profiler.after(done, metrics)
        if log_due:  # the device is busy with this step while the host reads the last ones
            reader.read(log_it=True)
        reader.add(done, metrics, loader.source_tokens())
        in_flight.add(metrics)
        stopping = stop.stop_after(done)
        final = done == total or stopping
        log_due = done % cfg.train.log_every == 0 or final
        if evaluation.due(done):
            reader.read(log_it=log_due)
            log_due = False
            evaluate_at(done)
        if final or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            reader.read(log_it=log_due)
            log_due = False
            ckpts.save(done, parts.to_model_order(state), loader.get_state(), cfg)
        if stopping:
            ckpts.wait()
            info(f"stopped by {stop.signal_name} after step {done}; checkpoint saved in "
                 f"{ckpts.directory}; run the same command again to resume")
            return reader.last
        if done < total:
            batch = next(loader)  # the host prepares the next batch while the device computes
    reader.read(log_it=log_due)
    ckpts.wait()  # the last save's failure (a full disk) is reported before "done"
    if reader.truncated:
        info(f"{reader.truncated:,} of {reader.records:,} records read were longer than "
             f"data.seq_len={cfg.data.seq_len} and were truncated")
    info(f"done: step {total} after {time.perf_counter() - reader.start:.1f}s; "
         f"run directory {cfg.train.run_dir}")
    return reader.last


def compile_step(parts: Components, loader: Loader):
    """The train step compiled for the abstract state and the loader's batch shapes (nothing
    allocated), reported, and refused when it cannot fit the device."""
    start = time.perf_counter()
    compiled = parts.train_step.lower(parts.abstract_state, loader.abstract_batch).compile()
    report_compiled(compiled, time.perf_counter() - start, parts.flops_per_step)
    return compiled


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
    perf.check_fits(memory, jax.devices()[0])


def _resume_or_init(parts: Components, ckpts: Checkpoints, loader: Loader) -> TrainState:
    """The latest readable checkpoint (state and data position), or a fresh state."""
    cfg = parts.cfg
    latest = ckpts.latest_step()
    if latest is None and cfg.train.init_from:
        return _init_from(parts)
    if latest is None:
        return parts.init_state()
    if not cfg.train.resume:
        raise UserError(f"{ckpts.directory} already holds checkpoints (latest step {latest}); "
                        "set train.resume=true to continue that run or choose another train.run_dir")
    restored = ckpts.restore(parts.abstract_state, loader, cfg, fit=_readable)
    if restored is None:
        raise UserError(f"no readable checkpoint is left in {ckpts.directory} (unreadable or "
                        "damaged ones were moved aside); choose another train.run_dir to start afresh")
    state, step = restored
    info(f"resumed from step {step} of {ckpts.directory}")
    state = state.replace(params=_with_histories(state.params, parts))
    _report_schedule_change(ckpts.saved_config(step), cfg, step)
    return parts.to_run_order(state)


def _readable(abstract_state: TrainState, saved: dict) -> TrainState:
    """What to read of a checkpoint: its fp8 amax histories as far as they fit this run."""
    return abstract_state.replace(params=readable(abstract_state.params,
                                                  saved_shapes(saved["params"])))


def _with_histories(params, parts: Components):
    """`params` with this run's fp8 amax histories: those read, the others empty (said)."""
    params, fresh = fitted(params, parts.abstract_state.params)
    if fresh:
        info(f"fp8 delayed scaling: {len(fresh)} amax histories (e.g. {fresh[0]}) start empty: "
             "none of their length was read; the first step quantizes with scale 1")
    return params


def _report_schedule_change(saved: dict, cfg: Config, step: int) -> None:
    """Say so when the learning rate at `step` differs from the one the checkpoint was
    trained towards (train.steps or the schedule changed)."""
    try:
        saved_cfg = config_from_dict(saved)
    except UserError:  # written by another version: its schedule cannot be compared
        return
    change = schedule_change(saved_cfg.optimizer, saved_cfg.train.steps, cfg.optimizer,
                             cfg.train.steps, step)
    if change:
        info(change)


# Model fields that must agree with train.init_from's: they fix parameter shapes or the
# function the parameters compute. Dtypes, remat, scanning and max_len may differ.
INIT_FIELDS = FIXED_FIELDS["model"] + ("real_vocab_size", "norm_eps", "rope_theta",
                                       "rope_scaling", "rope_factor", "rope_low_freq_factor",
                                       "rope_high_freq_factor", "rope_original_max_len")


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
                            f"from --config {source / CONFIG_FILE})")
    return src


def _init_from(parts: Components) -> TrainState:
    """Step 0 of a new run with the parameters of another run directory (its latest
    checkpoint, or an imported model), restored straight into this mesh's shardings, and
    a fresh optimizer state."""
    cfg, tx = parts.cfg, parts.tx
    source = Path(cfg.train.init_from).absolute()
    params, step = restore_params(_init_source(cfg), parts.layout, None)
    params = _with_histories(params, parts)
    shardings = jax.tree.map(lambda a: a.sharding, parts.abstract_state)
    dtype = cfg.model.param_dtype

    def start(params):
        weights, histories = split_histories(params)  # histories stay float32
        params = nnx.merge_state(jax.tree.map(lambda p: p.astype(dtype), weights), histories)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(trainable(params)))

    state = jax.jit(start, out_shardings=shardings)(params)
    info(f"initialised the parameters from {source} (step {step}); fresh optimizer state")
    return parts.to_run_order(state)
