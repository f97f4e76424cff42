"""`python -m pjit_llm.export --run DIR [--step S] [--dtype bfloat16|float32] [--out DIR]`

Writes a checkpoint's parameters alone (no optimizer state, no data position), cast to the
chosen dtype, with the model config beside them: what inference needs. `load_params`
restores such an export straight into the shardings of any mesh.
"""

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from pjit_llm import checksums
from pjit_llm.checkpoint import Checkpoints, checkpoint_dir, read_checksums
from pjit_llm.config import Config, MeshConfig, ModelConfig, load_config
from pjit_llm.errors import UserError, first_line, run_cli
from pjit_llm.mesh import make_mesh
from pjit_llm.sharding import Layout, check_divisible, param_shardings
from pjit_llm.train_step import abstract_model

PARAMS_DIR = "params"  # parameters alone, in an export or an imported run directory


def run_config(run_dir: Path, overrides=(), emulate_devices: int = 0) -> Config:
    """A training run's recorded config with `overrides`, its run directory pointing at
    `run_dir` (so checkpoints are found wherever the directory now is)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass --run the "
                        "train.run_dir of a training run")
    extra = [f"mesh.emulate_devices={emulate_devices}"] if emulate_devices else []
    cfg = load_config(str(path), list(overrides) + extra)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))


def restore_params(cfg: Config, layout: Layout, step: int | None):
    """(params, step) of a run, restored straight into `layout`'s shardings and without the
    optimizer state: from a training checkpoint (the latest when `step` is None) or, in a run
    holding parameters alone (imported by pjit_llm.convert, not trained since), as step 0.
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
    ckpts = Checkpoints(checkpoint_dir(cfg), dataclasses.replace(cfg.checkpoint, async_save=False))
    try:
        steps = ckpts.manager.all_steps()
    finally:
        ckpts.close()
    params_only = Path(cfg.train.run_dir).absolute() / PARAMS_DIR
    if not steps and params_only.is_dir():
        if step not in (None, 0):
            raise UserError(f"{cfg.train.run_dir} holds imported parameters alone (step 0) "
                            f"and no checkpoint for step {step}; drop --step")
        return params_only, (), 0
    if not steps:
        raise UserError(f"no checkpoints in {ckpts.directory}; train first")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"no checkpoint for step {step} in {ckpts.directory}; it has "
                        f"{', '.join(map(str, sorted(steps)))}")
    return ckpts.directory / str(step) / "state", ("params",), step


def params_target(model: ModelConfig, layout: Layout):
    """The parameters' shapes and dtypes with their shardings in `layout`: a restore target."""
    _, abstract = abstract_model(model, layout)
    check_divisible(layout, abstract)
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


def export(run_dir: Path, out: Path | None, step: int | None, dtype: str) -> Path:
    cfg = run_config(run_dir)
    layout = Layout(make_mesh(MeshConfig(data=-1)), cfg.mesh.rules)
    params, step = restore_params(cfg, layout, step)
    out = out or run_dir / "export" / f"step_{step}-{dtype}"
    if out.exists():
        raise UserError(f"{out} already exists; remove it or pass another --out")
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    model = dataclasses.replace(cfg.model, param_dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # assemble beside the target, then rename: never a half-written export
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        (tmp / "model.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model), sort_keys=False))
        (tmp / "step").write_text(f"{step}\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_params(export_dir: Path, layout: Layout):
    """(ModelConfig, params) of an export, restored into `layout`'s shardings."""
    try:
        model = ModelConfig(**yaml.safe_load((export_dir / "model.yaml").read_text()))
    except (OSError, TypeError, yaml.YAMLError):
        raise UserError(f"{export_dir} is not an export (no readable model.yaml)") from None
    return model, restore_partial(export_dir / PARAMS_DIR, (), params_target(model, layout))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="the training run directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--out", type=Path, help="output directory (default: RUN/export/step_S-DTYPE)")
    args = p.parse_args(argv)
    out = export(args.run.absolute(), args.out and args.out.absolute(), args.step, args.dtype)
    print(f"wrote parameters of step {(out / 'step').read_text().strip()} in {args.dtype} to {out}")


if __name__ == "__main__":
    run_cli(main)
