"""`python -m pjit_llm.evaluate --run DIR [--step S] [--batches N] [--quantize int8] [--emulate-devices N] [key=value ...]`

Restores a training checkpoint or an export onto the current devices (any mesh: override mesh.*) and
reports the held-out loss, perplexity and, for byte-level tokens, bits per byte: the same
figures, on the same validation batches, as the evaluation during training. Overrides
apply to the run's recorded config (for instance another data.val_split). `--quantize int8`
evaluates the weights quantized to int8 at load time (an int8 export is int8 already).
"""

import json
from pathlib import Path

from pjit_llm import xla_flags
from pjit_llm.command_line import command_parser, emulated
from pjit_llm.errors import UserError, run_cli
from pjit_llm.inference.evaluation import evaluate_run
from pjit_llm.metrics import info
from pjit_llm.models.quantize import check_quantize


def main(argv=None) -> None:
    p = command_parser("python -m pjit_llm.evaluate", __doc__)
    p.add_argument("--run", required=True, type=Path,
                   help="the training run directory, or an export (pjit_llm.export)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--batches", type=int, help="validation batches (default: train.eval_batches)")
    p.add_argument("--quantize", default="none", metavar="none|int8",
                   help="int8: weight-only int8, quantized at load time")
    args = p.parse_intermixed_args(argv)
    if args.batches is not None and args.batches < 1:
        raise UserError("--batches must be at least 1")
    check_quantize(args.quantize)
    xla_flags.apply_defaults()
    step, result = evaluate_run(args.run, args.step, args.batches, emulated(args), args.quantize)
    info(json.dumps({"step": step, **result}))


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
