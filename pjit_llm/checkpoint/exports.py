"""Exports: a checkpoint's parameters alone (no optimizer state, no data position), cast to
one dtype, with the model config beside them: what inference needs. Written from parameters
sharded over the devices (so a model that only fits sharded can be exported) and read back
into the shardings of any mesh.
"""

import dataclasses
import shutil
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml

from pjit_llm.checkpoint.runs import PARAMS_DIR, params_target, restore_params, restore_partial
from pjit_llm.config import Config, load_section
from pjit_llm.errors import UserError
from pjit_llm.models.llama.config import ModelConfig
from pjit_llm.parallel.layout import Layout

MODEL_FILE = "model.yaml"  # the export's model section


def write_export(cfg: Config, layout: Layout, out: Path | None, step: int | None,
                 dtype: str) -> tuple[Path, int]:
    """Write the parameters of the run `cfg` (step `step`, default the latest), restored
    into `layout` and cast to `dtype`, to `out` (default RUN/export/step_S-DTYPE)."""
    params, step = restore_params(cfg, layout, step)
    out = out or Path(cfg.train.run_dir) / "export" / f"step_{step}-{dtype}"
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
        (tmp / MODEL_FILE).write_text(yaml.safe_dump(dataclasses.asdict(model), sort_keys=False))
        (tmp / "step").write_text(f"{step}\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, step


def load_params(export_dir: Path, layout: Layout):
    """(ModelConfig, params) of an export, restored into `layout`'s shardings."""
    model = export_model(export_dir)
    return model, restore_partial(export_dir / PARAMS_DIR, (), params_target(model, layout))


def export_model(export_dir: Path) -> ModelConfig:
    """An export's model config, read and checked like every other config."""
    if not (export_dir / MODEL_FILE).is_file():
        raise UserError(f"{export_dir} is not an export (no {MODEL_FILE}); pass a directory "
                        "written by pjit_llm.export")
    return load_section(ModelConfig, str(export_dir / MODEL_FILE), "model")
