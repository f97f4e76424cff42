"""`python -m pjit_llm.convert import|export`: model checkpoints to and from Hugging Face.

import --hf DIR --out RUN_DIR [--dtype D]
    reads config.json (whose model_type picks the model family) and the safetensors shards
    of DIR and writes a run directory (config.yaml, params/, the tokenizer files) that
    generate, evaluate and `train.init_from=RUN_DIR` read like a trained run.
export --run RUN_DIR [--step S] --out DIR [--dtype D] [--shard-size 2GB]
    writes config.json and safetensors shards that transformers' AutoModelForCausalLM loads.

Both go tensor by tensor, so host memory never holds the model (pjit_llm/interop/hf.py).
"""

import argparse
from pathlib import Path

from pjit_llm.errors import run_cli
from pjit_llm.interop import safetensors_io
from pjit_llm.interop.hf import export_hf, import_hf, return_freed_memory


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="Hugging Face model directory -> run directory")
    i.add_argument("--hf", required=True, type=Path, help="directory with config.json and *.safetensors")
    i.add_argument("--out", required=True, type=Path, help="the run directory to create")
    i.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="parameter dtype (default: the checkpoint's, float32 for a float16 "
                   "one; float32 for fine-tuning)")
    e = sub.add_parser("export", help="run directory -> Hugging Face model directory")
    e.add_argument("--run", required=True, type=Path, help="a training or imported run directory")
    e.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    e.add_argument("--out", required=True, type=Path, help="the directory to create")
    e.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="weight dtype (default: the run's model.param_dtype)")
    e.add_argument("--shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    args = p.parse_args(argv)
    return_freed_memory()
    if args.command == "import":
        out = import_hf(args.hf.absolute(), args.out.absolute(), args.dtype)
        print(f"imported {args.hf} to {out}; generate with `python -m pjit_llm.generate --run "
              f"{out} --prompt ...`, fine-tune with `train.init_from={out}`")
    else:
        shard_bytes = safetensors_io.parse_size(args.shard_size)
        out, step = export_hf(args.run.absolute(), args.out.absolute(), args.step, args.dtype,
                              shard_bytes)
        print(f"exported step {step} of {args.run} to {out} (transformers' "
              "AutoModelForCausalLM.from_pretrained reads it)")


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
