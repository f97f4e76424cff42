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
Each measurement is repeated; the tables give the median.
"""

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

from pjit_llm.errors import UserError, run_cli


def bench_data(args) -> list[dict]:
    import gc

    from pjit_llm.config import load_config
    from pjit_llm.training.build import open_data
    from pjit_llm.training.measure import data_throughput

    cfg = load_config(args.config, args.overrides)
    dataset, tokenizer = open_data(cfg)
    rows = []
    for workers in args.workers:
        rates = [data_throughput(dataset, tokenizer, cfg.data, workers, args.batches, args.warmup)
                 for _ in range(args.repeats)]
        gc.collect()
        source = (f"mixture of {len(cfg.data.mixture)}" if cfg.data.mixture else cfg.data.source)
        rows.append({"source": source, "format": cfg.data.format, "tokenizer": cfg.data.tokenizer,
                     "workers": workers, "batch": f"{cfg.data.batch_size}x{cfg.data.seq_len}",
                     "tokens_per_s": statistics.median(rates),
                     "min": min(rates), "max": max(rates), "repeats": len(rates)})
    return rows


def bench_save(args) -> list[dict]:
    import tempfile

    from pjit_llm.config import load_config
    from pjit_llm.training.build import build
    from pjit_llm.training.measure import save_times

    parts = build(load_config(args.config, args.overrides))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        return [save_times(parts, Path(tmp, mode), mode == "async", args.repeats)
                for mode in ("async", "sync")]


def bench_step(args) -> list[dict]:
    from pjit_llm.config import load_config
    from pjit_llm.parallel import distributed
    from pjit_llm.parallel.mesh import use_emulated_devices
    from pjit_llm.training.measure import measure

    base = list(args.overrides) + ([f"mesh.emulate_devices={args.emulate_devices}"]
                                   if args.emulate_devices else [])
    variants = [("", [])] + [(v, v.split()) for v in args.variant]
    configs = [(name, load_config(args.config, base + extra)) for name, extra in variants]
    use_emulated_devices(configs[0][1].mesh.emulate_devices)
    distributed.initialize(configs[0][1], {"bench.variant": list(args.variant),
                                           "bench.steps": args.steps, "bench.warmup": args.warmup,
                                           "bench.repeats": args.repeats})
    rows = []
    try:
        for i, (name, cfg) in enumerate(configs):
            for r in range(args.repeats):
                trace = args.profile and r == 0 and str(Path(args.profile, f"row{i}"))
                rows.append({"variant": name or "base",
                             **measure(cfg, args.steps, args.warmup, trace)})
    finally:
        distributed.shutdown()
    return rows


def bench_memory(args) -> list[dict]:
    import dataclasses

    from pjit_llm.config import load_config
    from pjit_llm.parallel.mesh import use_emulated_devices
    from pjit_llm.training.measure import step_memory

    base = list(args.overrides) + ([f"mesh.emulate_devices={args.emulate_devices}"]
                                   if args.emulate_devices else [])
    rows = []
    for name, extra in [("", [])] + [(v, v.split()) for v in args.variant]:
        cfg = load_config(args.config, base + extra)
        use_emulated_devices(cfg.mesh.emulate_devices)
        row = {"variant": name or "base", **step_memory(cfg)}
        if args.cap:
            # Double the sequence while the plan fits the cap: the longest that did.
            cap, fits, seq = args.cap * 2**30, None, cfg.data.seq_len
            while seq <= args.max_seq:
                data = dataclasses.replace(cfg.data, seq_len=seq)
                model = dataclasses.replace(cfg.model, max_len=max(cfg.model.max_len, seq))
                if step_memory(dataclasses.replace(cfg, data=data, model=model))["peak"] > cap:
                    break
                fits, seq = seq, seq * 2
            row.update(cap_gib=args.cap, longest_seq=fits)
        rows.append(row)
    return rows


def bench_generate(args) -> list[dict]:
    import dataclasses

    from pjit_llm.checkpoint.runs import inference_params, run_config
    from pjit_llm.config import load_config
    from pjit_llm.inference.speed import generation_rows, transformers_rows
    from pjit_llm.parallel.mesh import use_emulated_devices
    from pjit_llm.training.build import build

    base = list(args.overrides) + ([f"mesh.emulate_devices={args.emulate_devices}"]
                                   if args.emulate_devices else [])
    rows, model = [], None
    for name, extra in [("", [])] + [(v, v.split()) for v in args.variant]:
        cfg = (run_config(args.run.absolute(), base + extra) if args.run
               else load_config(args.config, base + extra))
        use_emulated_devices(cfg.mesh.emulate_devices)
        # Decoding attends over a cache under a general mask: XLA's attention.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
        parts = build(cfg, batches=False)
        if not args.run:
            params = parts.init_state().params
        for quantize in args.quantize:
            if args.run:  # at load time, as generate and evaluate do
                params = inference_params(parts.cfg, parts.layout, None, quantize)[0]
            elif quantize != "none":
                raise UserError("--quantize needs --run: a checkpoint or export to quantize")
            for r in generation_rows(parts.cfg, params, parts.layout, args.batch,
                                     args.prompt_len, args.new_tokens, args.repeats):
                label = " ".join(filter(None, [name, "" if quantize == "none" else quantize]))
                rows.append({"variant": label or "base", "implementation": "pjit_llm",
                             "quantize": quantize, **r})
        model = parts.model
        del params
    if args.transformers:
        for r in transformers_rows(str(args.transformers), args.batch, args.prompt_len,
                                   args.new_tokens, args.repeats, model.vocab_size):
            rows.append({"variant": "transformers generate", "implementation": "transformers",
                         **r})
    return rows


def print_table(header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in [header] + lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def _maybe(value, fmt) -> str:
    """A table cell: "n/a" where a figure is unknown (or not measured for that row)."""
    if value is None:
        return "n/a"
    return fmt.format(value) if isinstance(fmt, str) else fmt(value)


def _pipeline(row: dict) -> str:
    if row["stages"] == 1:
        return "-"
    return (f"S={row['stages']} M={row['microbatches']} R={row['repeats']}, "
            f"bubble {100 * row['bubble']:.0f}%")


def print_rows(command: str, rows: list[dict]) -> None:
    from pjit_llm.metrics import human_bytes, human_count

    if command == "step":
        print(f"{rows[0]['devices']} x {rows[0]['device_kind']}; step times over "
              f"{rows[0]['steps']} synchronised steps")
        base_s = rows[0]["step_s"]
        print_table(["variant", "params", "tokens/step", "attention", "pipeline",
                     "step ms (median)", "min", "max", "vs base", "tokens/s/device",
                     "TFLOP/s/device", "MFU (bf16 peak)", "peak memory", "state/device",
                     "compile s"],
                    [[r["variant"], human_count(r["params"]), f"{r['tokens_per_step']:,}",
                      r["attention"], _pipeline(r), f"{r['step_s'] * 1e3:,.1f}",
                      f"{r['step_min_s'] * 1e3:,.1f}", f"{r['step_max_s'] * 1e3:,.1f}",
                      f"{r['step_s'] / base_s:.2f}x",
                      f"{r['tokens_per_s_per_device']:,.0f}",
                      f"{r['tflops_per_device']:,.2f}",
                      "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                      "n/a" if r["peak_memory"] is None else human_bytes(r["peak_memory"]),
                      human_bytes(r["state_bytes_per_device"]), f"{r['compile_s']:.1f}"]
                     for r in rows])
    elif command == "memory":
        print("XLA's per-device memory plan of the compiled train step (not run)")
        cap = "cap_gib" in rows[0]
        print_table(["variant", "mesh", "batch x seq", "load balance", "arguments", "temporaries",
                     "peak", "compile s"] + ([f"longest seq in {rows[0]['cap_gib']:g} GiB"]
                                             if cap else []),
                    [[r["variant"], r["mesh"], f"{r['batch']}x{r['seq_len']}",
                      "on" if r["load_balance"] else "off",
                      _maybe(r["arguments"], human_bytes), _maybe(r["temporaries"], human_bytes),
                      _maybe(r["peak"], human_bytes), f"{r['compile_s']:.1f}"]
                     + ([_maybe(r["longest_seq"], "{:,}")] if cap else []) for r in rows])
    elif command == "generate":
        from pjit_llm.metrics import human_bytes
        print(f"prompts of {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens "
              "each (greedy); medians")
        print_table(["variant", "batch", "prefill ms", "prefill TFLOP/s", "decode tokens/s",
                     "ms/token", "params", "cache", "decode traffic", "of bandwidth"],
                    [[r["variant"], str(r["batch"]), f"{r['prefill_s'] * 1e3:,.1f}",
                      _maybe(r.get("prefill_tflops"), "{:.3f}"),
                      f"{r['decode_tokens_per_s']:,.0f}",
                      f"{r['time_per_output_token_s'] * 1e3:.2f}",
                      _maybe(r.get("param_bytes"), human_bytes),
                      _maybe(r.get("cache_bytes"), human_bytes),
                      _maybe(r.get("decode_bytes_per_s"), lambda b: f"{b / 1e9:.1f} GB/s"),
                      _maybe(r.get("bandwidth_share"), "{:.0%}")] for r in rows])
    elif command == "data":
        print_table(["source", "format", "tokenizer", "workers", "batch", "tokens/s (median)",
                     "min", "max"],
                    [[r["source"], r["format"], r["tokenizer"], str(r["workers"]), r["batch"],
                      f"{r['tokens_per_s']:,.0f}", f"{r['min']:,.0f}", f"{r['max']:,.0f}"]
                     for r in rows])
    else:
        print_table(["params", "state MiB", "save", "loop blocked s (median)", "until written s"],
                    [[f"{r['params']:,}", f"{r['state_bytes'] / 2**20:,.0f}", r["mode"],
                      f"{r['blocked_s']:.3f}", f"{r['write_s']:.3f}"] for r in rows])


def main(argv=None) -> None:
    from pjit_llm import xla_flags
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
    s.add_argument("--emulate-devices", type=int, default=0, metavar="N")
    s.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value")
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
    g.add_argument("--emulate-devices", type=int, default=0, metavar="N")
    g.add_argument("--json", action="store_true", help="print a JSON list of rows instead")
    g.add_argument("overrides", nargs="*", metavar="key.sub=value")
    m = sub.add_parser("memory", help="the compiled step's per-device memory plan, not run")
    m.add_argument("--config")
    m.add_argument("--variant", action="append", default=[], metavar="'key=value ...'",
                   help="a further row: these overrides on top of the others (repeatable)")
    m.add_argument("--cap", type=float, default=0.0, metavar="GIB",
                   help="also find the longest sequence whose step plans to fit GIB per device")
    m.add_argument("--max-seq", type=int, default=2**20, help="where --cap stops doubling")
    m.add_argument("--emulate-devices", type=int, default=0, metavar="N")
    m.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    m.add_argument("overrides", nargs="*", metavar="key.sub=value")
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
            rows = bench_step(args)
    elif args.command == "data":
        try:
            args.workers = [int(w) for w in args.workers.split(",")]
        except ValueError:
            raise UserError(f"--workers {args.workers!r} must be comma-separated integers") from None
        if min(args.workers) < 0 or args.batches < 1 or args.warmup < 0:
            raise UserError("--workers, --warmup must be >= 0 and --batches >= 1")
        rows = bench_data(args)
    elif args.command == "generate":
        args.batch = args.batch or [1, 8]
        args.quantize = args.quantize or ["none"]
        if min(args.batch) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
            raise UserError("need --batch >= 1, --prompt-len >= 1 and --new-tokens >= 2")
        if args.run and args.config:
            raise UserError("give --run or --config, not both")
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            rows = bench_generate(args)
    elif args.command == "memory":
        if args.cap < 0:
            raise UserError("--cap must be >= 0 GiB")
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            rows = bench_memory(args)
    else:
        rows = bench_save(args)
    import jax
    if jax.process_index() != 0:  # a multi-host step benchmark: one table, from process 0
        return
    if args.json and args.command == "generate":
        print(json.dumps(rows))
    elif args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_rows(args.command, rows)


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
