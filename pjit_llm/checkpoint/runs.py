"""Loading what a run directory holds: its recorded config, and its parameters without the
optimizer state, restored straight into the shardings of whatever mesh the caller has.

A run directory is written by training (config.yaml, checkpoints/) or by a Hugging Face
import (config.yaml, params/); an export (pjit_llm.export) holds model.yaml, config.yaml and
params/, so it reads as an imported run (its parameters possibly int8: model.quantize).
"""

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from pjit_llm.checkpoint import checksums
from pjit_llm.checkpoint.manager import Checkpoints, checkpoint_dir, read_checksums
from pjit_llm.config import Config, load_config
from pjit_llm.errors import UserError, first_line
from pjit_llm.models.llama.config import ModelConfig
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS, abstract_model
from pjit_llm.models.quantize import check_quantize, quantize_params, quantized_target
from pjit_llm.parallel.layout import Layout, check_divisible, param_shardings

PARAMS_DIR = "params"  # parameters alone, in an export or an imported run directory


def run_config(run_dir: Path, overrides=()) -> Config:
    """A training run's recorded config with `overrides`, its run directory pointing at
    `run_dir` (so checkpoints are found wherever the directory now is)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass --run the "
                        "train.run_dir of a training run")
    cfg = load_config(str(path), list(overrides))
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
    return path.name == "config.yaml" and ((path.parent / "metrics.jsonl").is_file()
                                           or (path.parent / "checkpoints").is_dir())


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


def restore_params(cfg: Config, layout: Layout, step: int | None):
    """(params, step) of a run, restored straight into `layout`'s shardings and without the
    optimizer state: from a training checkpoint (the latest when `step` is None) or, in a run
    holding parameters alone (imported by pjit_llm.convert, not trained since), as step 0, or
    from an export, as the step it was written from.
    The parameters of a training checkpoint are checked against the checksums saved with it."""
    where, prefix, step = params_location(cfg, step)
    params = restore_partial(where, prefix, params_target(cfg.model, layout))
    saved_sums = read_checksums(where.parent) if prefix else None
    damage = (checksums.first_mismatch(saved_sums, params, "/".join(prefix) + "/")
              if saved_sums else None)
    if damage:
        raise UserError(f"checkpoint step {step} in {where.parent.parent} is damaged ({damage}); "
                        f"move {where.parent} aside to use the previous checkpoint")
    return params, step


def params_location(cfg: Config, step: int | None) -> tuple[Path, tuple[str, ...], int]:
    """(Orbax item directory, key path of the parameters inside it, step) of a run."""
    directory = checkpoint_dir(cfg)
    params_only = Path(cfg.train.run_dir).absolute() / PARAMS_DIR
    steps = []
    if directory.is_dir() or not params_only.is_dir():  # opening one creates the directory
        ckpts = Checkpoints(directory, dataclasses.replace(cfg.checkpoint, async_save=False))
        try:
            steps = ckpts.manager.all_steps()
        finally:
            ckpts.close()
    if not steps and params_only.is_dir():
        step_file = params_only.parent / "step"  # an export's: the step it was written from
        held = int(step_file.read_text()) if step_file.is_file() else 0
        if step not in (None, held):
            what = "exported" if step_file.is_file() else "imported"
            raise UserError(f"{cfg.train.run_dir} holds {what} parameters alone (step {held}) "
                            f"and no checkpoint for step {step}; drop --step")
        return params_only, (), held
    if not steps:
        raise UserError(f"no checkpoints in {directory}; train first")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"no checkpoint for step {step} in {directory}; it has "
                        f"{', '.join(map(str, sorted(steps)))}")
    return directory / str(step) / "state", ("params",), step


def params_target(model: ModelConfig, layout: Layout):
    """The parameters' shapes and dtypes with their shardings in `layout`: a restore target
    (int8 values and scales where model.quantize=int8)."""
    _, abstract = abstract_model(model, layout)
    check_divisible(layout, abstract)
    if model.quantize == "int8":
        return quantized_target(abstract, layout, QUANTIZED_WEIGHTS)
    shardings = param_shardings(layout, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def restore_partial(where: Path, prefix: tuple[str, ...], target):
    """The arrays of the Orbax checkpoint item `where` that `target` names under `prefix`,
    nothing else: parameters without optimizer state, or a single parameter. Abstract arrays
    with a sharding are restored into it; without, as numpy arrays on the host (read once, no
    device copy)."""
    item = target
    for key in reversed(prefix):
        item = {key: item}

    def restore_arg(a):
        if getattr(a, "sharding", None) is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
        return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)

    restore_args = jax.tree.map(restore_arg, item)
    try:
        out = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(where, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # Orbax/TensorStore raise many types for damaged or mismatched files
        reason = first_line(e)
        raise UserError(f"the parameters in {where} are unreadable or do not match the model "
                        f"config ({reason})") from None
    for key in prefix:
        out = out[key]
    return out


def inference_params(cfg: Config, layout: Layout, step: int | None, quantize: str = "none"):
    """(params, step, model config) for evaluation and generation: `restore_params`, then with
    `quantize`="int8" the weights quantized on the mesh (a no-op for an int8 export, whose
    parameters are int8 already). The model config says how the parameters are held."""
    check_quantize(quantize)
    params, step = restore_params(cfg, layout, step)
    model = cfg.model
    if quantize == "int8" and model.quantize == "none":
        _, abstract = abstract_model(model, layout)
        params = quantize_params(params, layout, QUANTIZED_WEIGHTS, abstract)
        model = dataclasses.replace(model, quantize="int8")
    return params, step, model
