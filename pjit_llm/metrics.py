"""Where numbers go, from process 0 only: the console (a progress bar on a terminal, plain
lines otherwise), `metrics.jsonl`, TensorBoard event files (tensorboardX, no TensorFlow) in
the run directory, and with train.wandb_project a Weights & Biases run (the same scalars and
samples, and the resolved config)."""

import json
import math
import secrets
import sys
from pathlib import Path

import jax

from pjit_llm.errors import UserError, first_line

# In a run directory (checkpoint/run_dir.py lists its whole layout).
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"  # a resumed run continues the W&B run


class MetricsLog:
    def __init__(self, run_dir: Path, append: bool = False, total_steps: int | None = None,
                 first_step: int = 0, wandb: "WandbRun | None" = None):
        """`append` continues the files of a resumed run instead of starting afresh;
        `wandb` (process 0's) receives what TensorBoard does, and is closed with the log."""
        self.enabled = jax.process_index() == 0
        self._file = self._tb = self._bar = None
        self._wandb = wandb
        if not self.enabled:
            return
        self._file = open(run_dir / METRICS_FILE, "a" if append else "w")
        self._tb = summary_writer_class()(str(run_dir / TENSORBOARD_DIR))
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
        scalars = {("eval/" if key.startswith("eval_") else "train/") + key: value
                   for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))}
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step)
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
            if self._wandb is not None:
                self._wandb.log({tag: text}, step)

    def close(self, quietly: bool = False) -> None:
        """Flush and close the writers; `quietly` when the run has failed already, and a
        writer that cannot flush (a full disk) must not hide that failure."""
        closes = [w.close for w in (self._wandb, self._bar, self._tb, self._file) if w is not None]
        for close in closes:
            try:
                close()
            except (OSError, ValueError):
                if not quietly:
                    raise


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: where torch is installed,
    tensorboardX imports it (1.5 s of CPU in every run) only to accept torch tensors, which
    nothing here passes. While sys.modules["torch"] is None, `import torch` fails fast."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def require_wandb():
    """The wandb module, or the one-line error that names the extra to install."""
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb_project needs the wandb package: pip install "
                        "'pjit_llm[wandb]' (or clear train.wandb_project)") from None
    return wandb


class WandbRun:
    """A Weights & Biases run in `run_dir`/wandb, for process 0. Its id is kept in the run
    directory, so resuming the training resumes the W&B run; offline mode (train.wandb_mode or
    WANDB_MODE=offline) writes it to disk for `wandb sync` later, with no network."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict, resume: bool):
        wandb = require_wandb()
        id_file = run_dir / WANDB_ID_FILE
        run_id = (id_file.read_text().strip() if resume and id_file.exists()
                  else secrets.token_hex(4))
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        try:
            self._run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir),
                                   name=run_dir.absolute().name, config=config,
                                   mode=None if mode == "auto" else mode,
                                   # Leave stdout alone: the progress bar and log lines own it.
                                   settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:
            raise UserError(f"could not start the W&B run: {first_line(e, limit=300)}; run "
                            "`wandb login` or set train.wandb_mode=offline") from None

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, values: dict, step: int) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


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
