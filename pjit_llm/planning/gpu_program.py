"""A GPU's train step, compiled on emulated CPU devices to be analysed, never run.

It differs from the program XLA:CPU would run for the same config in three ways:
- The model is built for a GPU (models/target.py): the experts' grouped products are one
  `ragged_dot` each, lowered as JAX lowers it for GPUs (to XLA's ragged-dot instruction, one
  grouped product), and tokens cross devices in the compute dtype.
- XLA:CPU's bfloat16 normalization is off: it computes bfloat16 operations in float32 and
  keeps many buffers between kernels in float32, which a GPU's program holds in bfloat16.
  Its promotion of bfloat16 all-reduces to float32 is off too (a GPU sums in bfloat16).
- XLA:CPU cannot emit code for that program (ragged-dot, bfloat16 matrix products), so the
  compile fails after XLA has optimized the module and assigned its buffers. Both are read
  from XLA's dump of them: the optimized HLO text and the memory plan's total, which is the
  peak a compiled program's memory analysis reports (arguments + outputs + temporaries less
  aliased).
"""

import re
import tempfile
from functools import partial
from pathlib import Path

from pjit_llm.models.target import build_for

# Names the compiler set-up in the plan's cache key (compiled.py's `variant`).
VARIANT = "gpu-program-1"
_OPTIONS = {"xla_disable_hlo_passes": "all-reduce-promotion,float-normalization-bf16",
            "xla_dump_hlo_as_text": True}


def prepare() -> None:
    """Make this process build GPU programs: call once, in a process that runs none of them
    (planning/worker.py's), before anything is traced."""
    from jax._src.interpreters import mlir
    from jax._src.lax import lax as lax_internals

    build_for("gpu")
    mlir.register_lowering(lax_internals.ragged_dot_general_p,
                           partial(lax_internals._ragged_dot_general_lower, platform="gpu"),
                           platform="cpu")


def compile_for_gpu(lowered) -> tuple[str, dict]:
    """(the optimized HLO text, {"peak": the memory plan's bytes}) of a lowered step."""
    with tempfile.TemporaryDirectory(prefix="pjit_llm_plan_") as dump:
        failure = None
        try:
            lowered.compile({**_OPTIONS, "xla_dump_to": dump})
        except Exception as e:  # the expected end: no code for ragged-dot or bf16 products
            failure = e
        optimized = sorted(Path(dump).glob("*after_optimizations.txt"))
        report = sorted(Path(dump).glob("*after_optimizations-memory-usage-report.txt"))
        if not optimized or not report:  # it failed before optimizing: a real error
            raise failure or RuntimeError("XLA wrote no optimized module")
        total = re.search(r"Total bytes: (\d+)", report[-1].read_text())
        return optimized[-1].read_text(), {"peak": int(total.group(1)) if total else None}
