"""Honest calibration: run some of the plan's compiled candidates for a few steps on the devices
this process has (the emulated CPU mesh, or a GPU node) and set the measured step times beside
the predicted ones.

Which run: the plan's first half of `count` in its order (is the choice the fastest of its
close rivals?) and the rest at evenly spaced predicted times over the remaining fitting rows
(does the predicted order hold over the range the model claims to tell apart?). How: every
candidate is compiled and its state made first, then timed in rounds, each round a few steps
of each candidate in turn (each round starting at another candidate), and each candidate's
figure is the median of its rounds' medians, so that a load that comes and goes on a shared
machine falls on all of them alike. Where the candidates' states do not fit the devices
together (`memory` over budget: a GPU node and a large model), each is timed on its own in turn
and freed before the next."""

import gc
import math
import statistics
import time

import jax

from pjit_llm.training.build import build
from pjit_llm.training.measure import abstract_batch, synthetic_batch


def pick(rows: list[dict], count: int) -> list[dict]:
    fitting = [r for r in rows if r["fits"]]
    if len(fitting) <= count:
        return fitting
    head = (count + 1) // 2
    rest = fitting[head:]
    low, high = rest[0]["estimate"].step_s, rest[-1]["estimate"].step_s
    picked: list[int] = []
    for i in range(count - head):  # the nearest to evenly spaced predicted times
        target = low + (high - low) * (i + 1) / (count - head)
        free = [j for j in range(len(rest)) if j not in picked]
        picked.append(min(free, key=lambda j: abs(rest[j]["estimate"].step_s - target)))
    return fitting[:head] + [rest[j] for j in sorted(picked)]


def _timed(step, state, batch, steps: int):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))  # also keeps XLA:CPU's queue short
        times.append(time.perf_counter() - start)
    return state, statistics.median(times)


def _prepare(r: dict, warmup: int):
    devices = jax.devices()[:math.prod(r["candidate"].sizes)]
    parts = build(r["config"], devices=devices, announce=False)
    step = parts.train_step.lower(parts.abstract_state, abstract_batch(parts)).compile()
    state = parts.init_state()
    batch = synthetic_batch(parts.cfg, parts.layout)
    state, _ = _timed(step, state, batch, warmup)
    return [r, step, state, batch, []]


def measured_rows(rows: list[dict], count: int, steps: int, warmup: int, progress,
                  memory: float, rounds: int = 3) -> list[dict]:
    """`count` fitting rows (see `pick`), each timed `rounds` x `steps` steps after `warmup`;
    interleaved where their memory plans together stay within `memory` a device."""
    chosen = pick(rows, count)
    together = sum(r["memory"] for r in chosen) <= memory
    runs = []
    for i, r in enumerate(chosen):
        progress(i, len(chosen), f"running {r['candidate'].describe_mesh()} {r['candidate'].remat}")
        run = _prepare(r, warmup)
        if not together:
            for _ in range(rounds):
                run[2], median = _timed(run[1], run[2], run[3], steps)
                run[4].append(median)
            run[1:4] = [None] * 3
            gc.collect()
        runs.append(run)
    for k in range(rounds if together else 0):
        progress(k, rounds, "timing in rounds")
        for j in range(len(runs)):  # each round starts further along: no place is always first
            run = runs[(j + k * len(runs) // rounds) % len(runs)]
            run[2], median = _timed(run[1], run[2], run[3], steps)
            run[4].append(median)
    progress(len(chosen), len(chosen), "measured")
    return [{"rank": next(i for i, x in enumerate(rows) if x is r) + 1,
             "candidate": r["candidate"], "predicted": r["estimate"].step_s,
             "measured": statistics.median(medians)} for r, _, _, _, medians in runs]
