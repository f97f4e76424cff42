"""The training loop's periodic actions, each a small object the loop calls at its steps:
reading metrics (log lines, non-finite losses), bounding the steps in flight, evaluation with
samples, and profiling. Checkpointing is Checkpoints (checkpoint/manager.py) and the stop
request is StopRequest (preemption.py)."""

import collections
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from pjit_llm import perf
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.inference.evaluation import evaluate
from pjit_llm.inference.generator import Generator, Sampling
from pjit_llm.metrics import MetricsLog, info
from pjit_llm.models.moe import ROUTER_METRICS
from pjit_llm.parallel.layout import Layout
from pjit_llm.training.preemption import MAX_IN_FLIGHT


class MetricsReader:
    """Collects each step's device metrics and reads them to the host only when asked: at
    log intervals (one step late, while the device works on the next), before a save (so a
    non-finite state is never saved) and at the end. Too many non-finite losses stop the run."""

    def __init__(self, cfg: Config, log: MetricsLog, flops_per_step: float, tokens_per_step: int,
                 first_step: int, ckpts):
        self.cfg, self.log, self.ckpts = cfg, log, ckpts
        self.flops_per_step, self.tokens_per_step = flops_per_step, tokens_per_step
        self.resumed_step = first_step or None
        self.peak = perf.peak_flops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
        self.unread: list[tuple[int, dict]] = []
        self.source_tokens: dict[str, int] = {}  # per mixture source, at the last step added
        self.bad_steps = 0
        self.records = self.truncated = 0  # chat/prompt_completion records read, and cut short
        self.last: dict = {}
        self.start = time.perf_counter()
        self.mark = (first_step, self.start)  # (step, time) throughput is measured from

    def add(self, step: int, metrics: dict, source_tokens: dict[str, int] | None = None) -> None:
        """`source_tokens`: the loader's count per mixture source after this step's batch."""
        self.unread.append((step, metrics))
        if source_tokens:
            self.source_tokens = source_tokens

    def restart_clock(self, step: int) -> None:
        """Time spent from here to `step` (evaluating, say) is not training throughput."""
        self.mark = (step, time.perf_counter())

    def read(self, log_it: bool) -> None:
        """Pull the unread metrics to the host, stop on non-finite losses, log a line."""
        if not self.unread:
            return
        steps, host = [s for s, _ in self.unread], jax.device_get([m for _, m in self.unread])
        self.unread = []
        for m in host:  # every step's, logged or not
            self.records += int(m.get("records", 0))
            self.truncated += int(m.get("truncated", 0))
        finite = [math.isfinite(float(m["loss"])) for m in host]
        self.bad_steps += finite.count(False)
        if self.bad_steps > self.cfg.train.max_bad_steps:
            raise UserError(non_finite_message(steps[finite.index(False)], self.resumed_step,
                                               self.ckpts.all_steps(), self.ckpts.directory))
        if log_it:
            self._log(steps, host, finite)

    def _log(self, steps: list[int], host: list[dict], finite: list[bool]) -> None:
        now = time.perf_counter()
        good = [m for m, ok in zip(host, finite) if ok] or host
        steps_done = steps[-1] - self.mark[0]
        rates = perf.throughput(steps_done * self.flops_per_step,
                                steps_done * self.tokens_per_step, now - self.mark[1],
                                jax.device_count(), self.peak)
        record = {"step": steps[-1], "loss": sum(float(m["loss"]) for m in good) / len(good),
                  "grad_norm": float(host[-1]["grad_norm"]), "lr": float(host[-1]["lr"]),
                  "tokens_per_s": rates["tokens_per_s"],
                  "step_s": (now - self.mark[1]) / max(steps_done, 1),
                  "tflops_per_device": rates["tflops_per_device"], "elapsed_s": now - self.start}
        if rates["mfu"] is not None:
            record["mfu"] = rates["mfu"]
        for name in ROUTER_METRICS:  # a mixture of experts' router, over the interval
            if name in host[-1]:
                record[name] = sum(float(m[name]) for m in good) / len(good)
        in_use = perf.device_memory_in_use(jax.local_devices()[0])
        if in_use is not None:
            record["memory_gib"] = in_use / 2**30
        if self.bad_steps:
            record["skipped_steps"] = self.bad_steps
        if "truncated" in host[-1]:  # since this process started (or resumed) the run
            record["records"], record["truncated_records"] = self.records, self.truncated
        record.update(global_source_tokens(self.source_tokens))
        self.mark = (steps[-1], now)
        self.log.write(record)
        self.last.update(record)


def global_source_tokens(local: dict[str, int]) -> dict[str, int]:
    """`tokens_<source>`: the tokens each mixture source gave the whole batch, summed over
    processes (every process logs at the same steps, so the gather lines up)."""
    if not local:
        return {}
    counts = np.array(list(local.values()), np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        # JAX arrays hold 32-bit integers unless x64 is on: gather the int64s as pairs of them.
        pairs = np.asarray(multihost_utils.process_allgather(counts.view(np.int32)))
        counts = np.ascontiguousarray(pairs).view(np.int64).sum(axis=0)
    return {f"tokens_{tag}": int(n) for tag, n in zip(local, counts)}


# A loss that turns non-finite within this many steps of a resume points at the checkpoint
# resumed from (its run had finite losses up to it), not at the learning rate.
SUSPECT_STEPS = 10


def non_finite_message(bad_step: int, resumed_step: int | None, saved_steps: list[int],
                       directory: Path) -> str:
    """The one-line error for a non-finite loss at `bad_step` in a run that resumed from
    `resumed_step` (None for a fresh run), with checkpoints `saved_steps` in `directory`."""
    head = f"the training loss was not finite at step {bad_step}"
    if resumed_step is not None and bad_step - resumed_step <= SUSPECT_STEPS:
        suspect = [s for s in saved_steps if s >= resumed_step] or [resumed_step]
        earlier = [s for s in saved_steps if s < resumed_step]
        names = "step" + "s" * (len(suspect) > 1) + " " + ", ".join(map(str, suspect))
        fix = (f"move {names} out of {directory} (or set checkpoint.directory to a copy "
               f"without {'them' if len(suspect) > 1 else 'it'}) to resume from step {max(earlier)}"
               if earlier else "no earlier checkpoint is kept: choose another train.run_dir "
               "to start afresh")
        after = bad_step - resumed_step
        return (f"{head}, {after} step{'s' * (after != 1)} after resuming from checkpoint step "
                f"{resumed_step} in {directory}: that checkpoint may be damaged; {fix}")
    kept = f"the last good checkpoint is step {max(saved_steps)} in {directory}; " if saved_steps else ""
    return (f"{head}; {kept}lower optimizer.lr, raise optimizer.warmup_steps, or allow skipping "
            "with train.max_bad_steps")


class InFlight:
    """Bounds the steps dispatched and not yet finished. XLA:CPU collectives deadlock with
    too many in flight; across processes the bound also keeps the host loops within a few
    steps of each other, which the agreed stop step relies on (preemption.py)."""

    def __init__(self, bounded: bool, limit: int = MAX_IN_FLIGHT):
        self.bounded, self.limit = bounded, limit
        self.queue = collections.deque()

    def add(self, metrics) -> None:
        if self.bounded:
            self.queue.append(metrics)
            if len(self.queue) > self.limit:
                jax.block_until_ready(self.queue.popleft())


class Evaluation:
    """The held-out loss at train.eval_every and at the end, with continuations of
    train.sample_prompts (to the console and TensorBoard's text tab)."""

    def __init__(self, cfg: Config, eval_step, val_batches: list, tokenizer, log: MetricsLog,
                 generator: Generator | None, byte_level: bool,
                 model_order: Callable = lambda params: params):
        self.cfg, self.eval_step, self.val_batches = cfg, eval_step, val_batches
        self.tokenizer, self.log, self.generator = tokenizer, log, generator
        self.byte_level = byte_level
        self.model_order = model_order  # the generator takes the layers in model order

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return (every and step % every == 0) or step == self.cfg.train.steps

    def __call__(self, params, step: int) -> dict:
        result = evaluate(self.eval_step, params, self.val_batches, self.byte_level)
        self.log.write({"step": step, **result})
        if self.generator is not None:
            self.samples(params, step)
        return result

    def samples(self, params, step: int) -> None:
        cfg, tokenizer = self.cfg, self.tokenizer
        prompts = list(cfg.train.sample_prompts)
        new = min(cfg.train.sample_tokens,
                  cfg.model.max_len - max(len(tokenizer.encode(p)) for p in prompts))
        if new < 1:
            return
        out = self.generator.generate(self.model_order(params),
                                      [tokenizer.encode(p) for p in prompts], new, tokenizer.eos_id)
        for i, (prompt, ids) in enumerate(zip(prompts, out)):
            text = prompt + tokenizer.decode(ids)
            info(f"sample {i} at step {step}: {text!r}")
            self.log.text(f"samples/{i}", text, step)


def sample_generator(cfg: Config, layout: Layout) -> Generator:
    """The generator of the in-training samples: train.sample_temperature and sample_top_p,
    seeded by train.seed, so every evaluation of a run draws from the same random stream."""
    sampling = Sampling(temperature=cfg.train.sample_temperature, top_p=cfg.train.sample_top_p,
                        seed=cfg.train.seed)
    return Generator(cfg.model, layout, sampling)


class Profiler:
    """A jax.profiler trace of train.profile_steps [first, last] into `directory`."""

    def __init__(self, steps: tuple[int, ...], directory: Path):
        self.steps, self.directory = steps, directory
        self.tracing = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int, metrics) -> None:
        if self.tracing and step == self.steps[1]:
            self.tracing = False
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            info(f"wrote a profile of steps {self.steps[0]}-{self.steps[1]} to {self.directory} "
                 "(TensorBoard's profile tab or Perfetto)")
