"""A run directory: what is in it, and how to open one.

    config.yaml       the resolved config the run was made with (training, import, export)
    checkpoints/S/    Orbax checkpoints by step: state, data position, config, checksums
                      (elsewhere when checkpoint.directory says so)
    params/           parameters alone: an imported model, or an export's
    step, model.yaml  an export's: the step its parameters come from, its model section
    metrics.jsonl     one JSON line per log and evaluation
    tensorboard/      TensorBoard event files (metrics.py writes these three)
    wandb/, wandb_run_id  a Weights & Biases run, with train.wandb_project
    profile/          jax.profiler traces of train.profile_steps
    export/           exports written by pjit_llm.export (each an export directory itself)
    tokenizer files   an import's Hugging Face tokenizer (interop/hf.py's TOKENIZER_FILES)

Training writes a run directory, `python -m pjit_llm.convert import` and `python -m
pjit_llm.export` write others of the same shape, and evaluate, generate, export and lm-eval
open any of them with `run_config`, wherever the directory has moved since.
"""

import dataclasses
import os
from pathlib import Path

import yaml

from pjit_llm.config import Config, load_config
from pjit_llm.errors import UserError
# Written by metrics.py, listed here with the rest of the layout.
from pjit_llm.metrics import METRICS_FILE, TENSORBOARD_DIR, WANDB_ID_FILE  # noqa: F401

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
PARAMS_DIR = "params"
STEP_FILE = "step"
MODEL_FILE = "model.yaml"
PROFILE_DIR = "profile"
EXPORTS_DIR = "export"


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.directory or Path(cfg.train.run_dir) / CHECKPOINTS_DIR).absolute()


def export_dir(cfg: Config, step: int, kind: str) -> Path:
    """Where `python -m pjit_llm.export` writes step `step` of the run as `kind` (a dtype or int8)."""
    return Path(cfg.train.run_dir) / EXPORTS_DIR / f"step_{step}-{kind}"


def write_config(directory: Path, cfg: Config) -> None:
    """The run's config.yaml: the resolved config, every key written out."""
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# What a reader of a run (evaluate, generate, export, init_from...) runs fp8 with: the amax
# histories of delayed scaling are the training run's state, which readers neither read nor
# update (model.fp8_scaling), so they scale each tensor by its own amax.
READER_OVERRIDES = ("model.fp8_scaling=current",)


def run_config(run_dir: Path, overrides=()) -> Config:
    """A training run's recorded config with `overrides`, its run directory pointing at
    `run_dir` (so checkpoints are found wherever the directory now is), as a reader runs it
    (READER_OVERRIDES)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass --run the "
                        "train.run_dir of a training run")
    cfg = load_config(str(path), [*overrides, *READER_OVERRIDES])
    return moved(cfg, cfg.train.run_dir, str(run_dir), _given(overrides))


def train_config(path: str | None, overrides=()) -> Config:
    """The config `train --config path` runs. A run's own config.yaml continues that run
    where the file now lies, whatever train.run_dir it records (the directory may have been
    moved or copied since); train.run_dir given among `overrides` starts a run there instead."""
    cfg = load_config(path, overrides)
    if not path or not is_run_config(Path(path)):
        return cfg
    given = _given(overrides)
    run_dir = cfg.train.run_dir if "train.run_dir" in given else str(Path(path).parent)
    recorded = load_config(path).train.run_dir  # written by training: valid on its own
    if os.path.abspath(recorded) == os.path.abspath(run_dir):
        return cfg
    return moved(cfg, recorded, run_dir, given)


def is_run_config(path: Path) -> bool:
    """Whether `path` is the config.yaml that training wrote into its run directory (beside
    the run's metrics or checkpoints)."""
    return path.name == CONFIG_FILE and ((path.parent / METRICS_FILE).is_file()
                                         or (path.parent / CHECKPOINTS_DIR).is_dir())


def moved(cfg: Config, recorded: str, run_dir: str, given=frozenset()) -> Config:
    """`cfg` with its run directory at `run_dir` instead of `recorded`; a checkpoint.directory
    that lay inside the recorded one (and was not given on the command line) moves with it."""
    checkpoint = cfg.checkpoint
    # Relative paths were relative to the same (unknown) working directory: compare as such.
    old_run, old_ckpt = Path(os.path.abspath(recorded)), Path(os.path.abspath(checkpoint.directory))
    if (checkpoint.directory and "checkpoint.directory" not in given
            and old_ckpt.is_relative_to(old_run)):
        checkpoint = dataclasses.replace(
            checkpoint, directory=str(Path(run_dir) / old_ckpt.relative_to(old_run)))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=run_dir),
                               checkpoint=checkpoint)


def _given(overrides) -> set[str]:
    """The dotted keys set on the command line."""
    return {item.partition("=")[0].strip() for item in overrides}
