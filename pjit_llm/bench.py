"""`python -m pjit_llm.bench [step|data|save|generate] [--config F] [key=value ...]`

step (the default): the compiled training step of a config on synthetic tokens: step time,
  tokens/s and model TFLOP/s per device, MFU, memory and compile time; `--variant` adds
  rows with further overrides, measured one after another in the same process.
data: packed, batched tokens per second the input pipeline delivers from the configured
  source and tokenizer, for each worker count, after a warm-up that covers starting workers.
save: how long a checkpoint save blocks the training loop, asynchronous against synchronous,
  for the configured model (parameters and AdamW state).
memory: XLA's per-device memory plan of the compiled training step (arguments, temporaries,
  peak) without running it, for each `--variant`; with `--cap GIB`, also the longest
  sequence (doubling data.seq_len) whose step plans to fit that many GiB per device.
generate: prefill time and TFLOP/s, decode tokens/s and time per output token for each batch
  size, and the decode step's memory traffic, for a run (trained or imported) or a config with
  random weights; `--transformers HF_DIR` adds transformers' generate on the same model.
Each measurement is repeated; the tables give the median. With --json every row also
says what made it (`config`, `overrides`, and `xla_flags`: the XLA_FLAGS given beyond ours),
so rows from several runs can be set side by side (`python -m pjit_llm.bench_report`).
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import jax

from pjit_llm import xla_flags
from pjit_llm.bench_tables import print_rows
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.command_line import add_shared, emulated
from pjit_llm.config import Config, load_config
from pjit_llm.errors import UserError, run_cli
from pjit_llm.inference.speed import generation_bench, transformers_rows
from pjit_llm.startup import started
from pjit_llm.training.measure import data_rows, memory_rows, save_rows, step_rows


def main(argv=None) -> None:
    xla_flags.apply_defaults()
    p = argparse.ArgumentParser(prog="python -m pjit_llm.bench")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="the compiled training step (the default command)")
    s.add_argument("--config")
    s.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    s.add_argument("--repeats", type=int, default=1, help="compile and time each row this often")
    s.add_argument("--variant", action="append", default=[], metavar="'key=value ...'",
                   help="a further row: these overrides on top of the others (repeatable)")
    s.add_argument("--profile", metavar="DIR", help="jax.profiler traces of each row's timed "
                   "steps into DIR/row<i> (TensorBoard's profile tab or Perfetto)")
    s.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_shared(s)
    d = sub.add_parser("data", help="tokens/s the input pipeline delivers")
    d.add_argument("--config")
    d.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    d.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    d.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    d.add_argument("overrides", nargs="*", metavar="key.sub=value")
    g = sub.add_parser("generate", help="prefill time and decode tokens/s per batch size")
    g.add_argument("--run", type=Path, help="a run directory (trained, or imported by "
                   "pjit_llm.convert); default: the config's model with random weights")
    g.add_argument("--config")
    g.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--variant", action="append", default=[], metavar="'key=value ...'",
                   help="further rows: these overrides on top of the others (repeatable)")
    g.add_argument("--quantize", action="append", choices=("none", "int8"),
                   help="weights as loaded (none) and/or quantized to int8 at load time: one "
                   "set of rows each (default none)")
    g.add_argument("--transformers", type=Path, metavar="HF_DIR", help="also time "
                   "transformers' generate on this Hugging Face model (the one --run imported)")
    g.add_argument("--json", action="store_true", help="print a JSON list of rows instead")
    add_shared(g)
    m = sub.add_parser("memory", help="the compiled step's per-device memory plan, not run")
    m.add_argument("--config")
    m.add_argument("--variant", action="append", default=[], metavar="'key=value ...'",
                   help="a further row: these overrides on top of the others (repeatable)")
    m.add_argument("--cap", type=float, default=0.0, metavar="GIB",
                   help="also find the longest sequence whose step plans to fit GIB per device")
    m.add_argument("--max-seq", type=int, default=2**20, help="where --cap stops doubling")
    m.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_shared(m)
    c = sub.add_parser("save", help="how long a checkpoint save blocks the loop")
    c.add_argument("--config")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--dir", help="where to write the checkpoints (a temporary directory in it)")
    c.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    c.add_argument("overrides", nargs="*", metavar="key.sub=value")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices and argv[0] not in ("-h", "--help"):
        argv.insert(0, "step")
    args = p.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        raise UserError("--repeats must be >= 1")
    if args.command == "step":
        if args.steps < 1 or args.warmup < 0:
            raise UserError("--steps must be >= 1 and --warmup >= 0")
        # With --json, stdout carries JSON alone; progress lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            variants = _variants(args)
            command = {"bench.variant": list(args.variant), "bench.steps": args.steps,
                       "bench.warmup": args.warmup, "bench.repeats": args.repeats}
            with started(variants[0][1], command):
                rows = step_rows(variants, args.steps, args.warmup, args.repeats, args.profile)
    elif args.command == "data":
        try:
            args.workers = [int(w) for w in args.workers.split(",")]
        except ValueError:
            raise UserError(f"--workers {args.workers!r} must be comma-separated integers") from None
        if min(args.workers) < 0 or args.batches < 1 or args.warmup < 0:
            raise UserError("--workers, --warmup must be >= 0 and --batches >= 1")
        rows = data_rows(load_config(args.config, args.overrides), args.workers, args.batches,
                         args.warmup, args.repeats)
    elif args.command == "generate":
        args.batch = args.batch or [1, 8]
        args.quantize = args.quantize or ["none"]
        if min(args.batch) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
            raise UserError("need --batch >= 1, --prompt-len >= 1 and --new-tokens >= 2")
        if args.run and args.config:
            raise UserError("give --run or --config, not both")
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            rows, model = generation_bench(_variants(args), bool(args.run), args.quantize,
                                           args.batch, args.prompt_len, args.new_tokens,
                                           args.repeats)
            if args.transformers:
                rows += [{"variant": "transformers generate", "implementation": "transformers", **r}
                         for r in transformers_rows(str(args.transformers), args.batch,
                                                    args.prompt_len, args.new_tokens,
                                                    args.repeats, model.vocab_size)]
    elif args.command == "memory":
        if args.cap < 0:
            raise UserError("--cap must be >= 0 GiB")
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            rows = memory_rows(_variants(args), args.cap, args.max_seq)
    else:
        rows = save_rows(load_config(args.config, args.overrides), args.repeats, args.dir)
    if jax.process_index() != 0:  # a multi-host step benchmark: one table, from process 0
        return
    origin = {"config": args.config, "overrides": list(args.overrides),
              "xla_flags": xla_flags.beyond_defaults(os.environ.get("XLA_FLAGS", ""))}
    rows = [{**origin, **r} for r in rows]
    if args.json and args.command == "generate":
        print(json.dumps(rows))
    elif args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_rows(args.command, rows)


def _variants(args) -> list[tuple[str, Config]]:
    """(name, config) of the base row and of each --variant: the run's recorded config (with
    --run) or --config's, with the overrides, then the variant's."""
    base = emulated(args)
    variants = [("", [])] + [(v, v.split()) for v in args.variant]
    if getattr(args, "run", None):
        return [(name, run_config(args.run.absolute(), base + extra)) for name, extra in variants]
    return [(name, load_config(args.config, base + extra)) for name, extra in variants]


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
