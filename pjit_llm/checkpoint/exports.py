"""Exports: a checkpoint's parameters alone (no optimizer state, no data position), cast to
one dtype or with the weight matrices quantized to int8 (models/quantize.py), with the model
config beside them: what inference needs. Written from parameters sharded over the devices (so
a model that only fits sharded can be exported) and read back into the shardings of any mesh.
The run's whole config is written beside them too (config.yaml, its model section as
exported), so that evaluate and generate read an export as they read a run directory.
"""

import dataclasses
import shutil
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml

from pjit_llm.checkpoint.run_dir import MODEL_FILE, PARAMS_DIR, STEP_FILE, export_dir, write_config
from pjit_llm.checkpoint.runs import inference_params
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.models.quantize import Int8Weight
from pjit_llm.parallel.layout import Layout

def write_export(cfg: Config, layout: Layout, out: Path | None, step: int | None,
                 dtype: str, quantize: str = "none") -> tuple[Path, int]:
    """Write the parameters of the run `cfg` (step `step`, default the latest), restored
    into `layout`, with quantize="int8" the weight matrices quantized from them, the other
    parameters cast to `dtype`, to `out` (default RUN/export/step_S-DTYPE or step_S-int8)."""
    params, step, model = inference_params(cfg, layout, step, quantize)
    name = "int8" if model.quantize == "int8" else dtype
    out = out or export_dir(cfg, step, name)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or pass another --out")
    params = jax.tree.map(lambda p: p if isinstance(p, Int8Weight) else p.astype(dtype), params,
                          is_leaf=lambda p: isinstance(p, Int8Weight))
    model = dataclasses.replace(model, param_dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # assemble beside the target, then rename: never a half-written export
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        (tmp / MODEL_FILE).write_text(yaml.safe_dump(dataclasses.asdict(model), sort_keys=False))
        # the export's own params/, never the run's checkpoints
        whole = dataclasses.replace(cfg, model=model, checkpoint=dataclasses.replace(
            cfg.checkpoint, directory=""))
        write_config(tmp, whole)
        (tmp / STEP_FILE).write_text(f"{step}\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, step
