"""Where numbers go, from process 0 only: the console (a progress bar on a terminal, plain
lines otherwise), `metrics.jsonl`, and TensorBoard event files (tensorboardX, no TensorFlow)
in the run directory."""

import json
import math
import sys
from pathlib import Path

import jax


class MetricsLog:
    def __init__(self, run_dir: Path, append: bool = False, total_steps: int | None = None,
                 first_step: int = 0):
        """`append` continues the files of a resumed run instead of starting afresh."""
        self.enabled = jax.process_index() == 0
        self._file = self._tb = self._bar = None
        if not self.enabled:
            return
        self._file = open(run_dir / "metrics.jsonl", "a" if append else "w")
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if sys.stdout.isatty() and total_steps:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=first_step, unit="step",
                             dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(("eval/" if key.startswith("eval_") else "train/") + key,
                                    value, step)
        if self._bar is not None and "loss" in record:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4g}",
                                  tok_s=f"{record['tokens_per_s']:,.0f}")
        elif self._bar is not None:
            self._bar.write(format_record(record))
        else:
            print(format_record(record), flush=True)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file:
            self._file.close()


def info(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)


def format_record(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 or not math.isfinite(value) else f"{value:,.0f}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"
