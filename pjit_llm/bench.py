"""`python -m pjit_llm.bench data [--workers 0,1,2] [--config F] [key=value ...]`

Measures what the input pipeline delivers: packed, batched tokens per second from the
configured source and tokenizer, for each worker count, after a warm-up that covers
starting the workers. Repeats each measurement and reports the median.
"""

import argparse
import json
import statistics
import time

from pjit_llm.errors import UserError, run_cli


def data_throughput(dataset, tokenizer, cfg, workers: int, batches: int, warmup: int) -> float:
    """Tokens per second (padding excluded) over `batches` batches after `warmup` batches."""
    from pjit_llm.data.pipeline import packed_batches

    it = iter(packed_batches(dataset.train, tokenizer, dataset.text_field, cfg, cfg.batch_size,
                             0, 1, train=True, num_workers=workers))
    try:
        for _ in range(warmup):
            next(it)
        start, tokens = time.perf_counter(), 0
        for _ in range(batches):
            tokens += int((next(it)["segment_ids"] > 0).sum())
        return tokens / (time.perf_counter() - start)
    finally:
        if hasattr(it, "close"):
            it.close()


def bench_data(args) -> list[dict]:
    import gc

    from pjit_llm.config import load_config
    from pjit_llm.data.sources import prepare
    from pjit_llm.data.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    dataset = prepare(cfg.data)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path, dataset.directory)
    rows = []
    for workers in args.workers:
        rates = [data_throughput(dataset, tokenizer, cfg.data, workers, args.batches, args.warmup)
                 for _ in range(args.repeats)]
        gc.collect()
        rows.append({"source": cfg.data.source, "tokenizer": cfg.data.tokenizer,
                     "workers": workers, "batch": f"{cfg.data.batch_size}x{cfg.data.seq_len}",
                     "tokens_per_s": statistics.median(rates),
                     "min": min(rates), "max": max(rates), "repeats": len(rates)})
    return rows


def print_table(rows: list[dict]) -> None:
    header = ["source", "tokenizer", "workers", "batch", "tokens/s (median)", "min", "max"]
    lines = [[r["source"], r["tokenizer"], str(r["workers"]), r["batch"],
              f"{r['tokens_per_s']:,.0f}", f"{r['min']:,.0f}", f"{r['max']:,.0f}"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in [header] + lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.bench")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="tokens/s the input pipeline delivers")
    d.add_argument("--config")
    d.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    d.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    d.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    d.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise UserError(f"--workers {args.workers!r} must be comma-separated integers") from None
    if min(args.workers) < 0 or args.batches < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--workers, --warmup must be >= 0 and --batches, --repeats >= 1")
    rows = bench_data(args)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_table(rows)


if __name__ == "__main__":
    run_cli(main)
