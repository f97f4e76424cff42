"""`python -m pjit_llm.export --run DIR [--step S] [--dtype bfloat16|float32] [--quantize int8] [--out DIR]`

Writes a checkpoint's parameters alone, cast to the chosen dtype (with --quantize int8: the
weight matrices in int8 with float32 scales per output channel, the rest in the dtype), with
the config beside them (pjit_llm/checkpoint/exports.py); evaluate and generate take the export
as their --run. The parameters are restored sharded over the available devices the way a
Hugging Face import places them, so a model that only fits sharded can be exported.
"""

from pathlib import Path

from pjit_llm.checkpoint.exports import write_export
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.command_line import command_parser, emulated
from pjit_llm.errors import run_cli
from pjit_llm.models.quantize import check_quantize
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.placement import place_for_conversion


def main(argv=None) -> None:
    p = command_parser("python -m pjit_llm.export", __doc__,
                       "changes to the run's config, as the export's config.yaml records it")
    p.add_argument("--run", required=True, type=Path, help="the training run directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--quantize", default="none", metavar="none|int8",
                   help="int8: weight matrices in int8 (about half the bytes of bfloat16)")
    p.add_argument("--out", type=Path,
                   help="output directory (default: RUN/export/step_S-DTYPE or step_S-int8)")
    args = p.parse_intermixed_args(argv)
    check_quantize(args.quantize)
    cfg = run_config(args.run.absolute(), emulated(args))
    use_emulated_devices(cfg.mesh.emulate_devices)
    layout = place_for_conversion(cfg).layout
    out, step = write_export(cfg, layout, args.out and args.out.absolute(), args.step,
                             args.dtype, args.quantize)
    what = args.dtype if args.quantize == "none" else f"int8 (the rest in {args.dtype})"
    print(f"wrote parameters of step {step} in {what} to {out}")


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
