"""A run's parameters without the optimizer state, restored straight into the shardings of
whatever mesh the caller has: from a training checkpoint, an imported run or an export (its
parameters possibly int8: model.quantize). Where they lie is run_dir.py's to say.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from pjit_llm.checkpoint import checksums, failures
from pjit_llm.checkpoint.manager import committed_steps, read_checksums
from pjit_llm.checkpoint.run_dir import PARAMS_DIR, STEP_FILE, checkpoint_dir
from pjit_llm.config import Config
from pjit_llm.errors import UserError, first_line
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.families import abstract_model, family_of
from pjit_llm.models.quantize import check_quantize, quantize_params, quantized_target
from pjit_llm.parallel.layout import Layout, check_divisible, param_shardings

# A reader of a live run reads its newest checkpoint again when the run saved newer ones
# while it read (retention may delete the one being read); this many times at most.
READ_ATTEMPTS = 5


def restore_params(cfg: Config, layout: Layout, step: int | None):
    """(params, step) of a run, restored straight into `layout`'s shardings and without the
    optimizer state: from a training checkpoint (the latest when `step` is None) or, in a run
    holding parameters alone (imported by pjit_llm.convert, not trained since), as step 0, or
    from an export, as the step it was written from.
    The parameters of a training checkpoint are checked against the checksums saved with it.
    Nothing in the run directory is changed: the run may be training now. When it saves a
    newer checkpoint while the latest is read (and its retention deletes the one read), the
    newest is read instead."""
    directory = checkpoint_dir(cfg)
    for _ in range(READ_ATTEMPTS):
        where, prefix, found = params_location(cfg, step)
        try:
            return _read_params(cfg.model, layout, where, prefix, found), found
        except UserError:
            if not prefix:
                raise
            if step is not None and not where.parent.exists():
                raise UserError(f"checkpoint step {step} in {directory} was deleted while it "
                                "was read (the training run keeps the newest checkpoint.keep); "
                                "pass a newer --step") from None
            if step is not None or max(committed_steps(directory), default=found) <= found:
                raise
    raise UserError(f"the training run saved newer checkpoints in {directory} faster than the "
                    "newest could be read; pass --step with a kept step")


def _read_params(model: DecoderConfig, layout: Layout, where: Path, prefix: tuple[str, ...],
                 step: int):
    params = restore_partial(where, prefix, params_target(model, layout))
    if not prefix:
        return params
    try:
        saved_sums = read_checksums(where.parent)
    except Exception as e:  # a missing or corrupt checksums item
        raise UserError(f"the checksums of checkpoint step {step} in {where.parent.parent} are "
                        f"unreadable ({first_line(e)})") from None
    damage = (checksums.first_mismatch(saved_sums, params, "/".join(prefix) + "/")
              if saved_sums else None)
    if damage:
        raise UserError(f"checkpoint step {step} in {where.parent.parent} is damaged ({damage}); "
                        f"move {where.parent} aside to use the previous checkpoint")
    return params


def params_location(cfg: Config, step: int | None) -> tuple[Path, tuple[str, ...], int]:
    """(Orbax item directory, key path of the parameters inside it, step) of a run."""
    directory = checkpoint_dir(cfg)
    params_only = Path(cfg.train.run_dir).absolute() / PARAMS_DIR
    steps = committed_steps(directory)  # read-only: the run may be training now
    if not steps and params_only.is_dir():
        step_file = params_only.parent / STEP_FILE  # an export's: the step it was written from
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


def params_target(model: DecoderConfig, layout: Layout):
    """The parameters' shapes and dtypes with their shardings in `layout`: a restore target
    (int8 values and scales where model.quantize=int8)."""
    _, abstract = abstract_model(model, layout)
    check_divisible(layout, abstract)
    if model.quantize == "int8":
        return quantized_target(abstract, layout, family_of(model).quantized_weights)
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
    failures.quiet_orbax_echoes()
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
        params = quantize_params(params, layout, family_of(model).quantized_weights, abstract)
        model = dataclasses.replace(model, quantize="int8")
    return params, step, model
