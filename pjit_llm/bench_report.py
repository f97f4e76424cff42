"""`python -m pjit_llm.bench_report table|loop|trace ...`: benchmark rows gathered from several
runs, as markdown.

table FILE...: the step rows and generation rows that `python -m pjit_llm.bench step|generate
  --json` printed (one JSON object, or a list of them, per line), each beside its base row with
  ratios, and rows that record a failed command (`{"error": ...}`). A row says what made it
  (config, overrides, XLA flags); the base of a config's rows is its first row made without
  overrides or flags (else its first row).
failed --bench step|generate: a row that records a benchmark command that failed, for `table` to show in its place.
loop METRICS: the speed a training run logged in its metrics.jsonl, as one step row to set
  beside the benchmark's (the median over the log intervals after --after steps).
trace DIR: where a profiled step's device time goes: the kernels of the jax.profiler traces
  under DIR by total time, and their shares by kind (matmul, attention, copies, the rest).

Reads files only: no device is touched (trace imports JAX's trace reader).
"""

import argparse
import collections
import json
import re
import statistics
from pathlib import Path

from pjit_llm.errors import UserError, run_cli

GIB = 2**30


def read_rows(paths: list[Path]) -> tuple[list[dict], int]:
    """The rows of `paths` in order, and how many lines were not JSON rows (a line cut short
    when a run was stopped)."""
    rows, unreadable = [], 0
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path} is not a file of benchmark rows; give the files that "
                            "`python -m pjit_llm.bench ... --json` wrote")
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                unreadable += 1
                continue
            found = value if isinstance(value, list) else [value]
            rows += [r for r in found if isinstance(r, dict)]
    return rows, unreadable


def label(row: dict) -> str:
    """What distinguishes a row from its config's base: its overrides, variant and XLA flags."""
    parts = list(row.get("overrides") or [])
    if row.get("variant") not in (None, "", "base"):
        parts.append(row["variant"])
    if row.get("xla_flags"):
        parts.append(f"XLA_FLAGS='{row['xla_flags']}'")
    return " ".join(parts) or "base"


def is_step(row: dict) -> bool:
    return "step_s" in row or row.get("command") == "step"


def is_generation(row: dict) -> bool:
    return "decode_tokens_per_s" in row or row.get("command") == "generate"


def _base_of(rows: list[dict]) -> dict | None:
    """The first successful row made with no overrides, variant or flags, else the first
    successful row."""
    ok = [r for r in rows if "error" not in r]
    return next((r for r in ok if label(r) == "base"), ok[0] if ok else None)


def _by_config(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("config") or "(built-in default config)", []).append(r)
    return groups


def tokens_per_s(row: dict) -> float:
    if "tokens_per_s" in row:
        return row["tokens_per_s"]
    return row["tokens_per_s_per_device"] * row.get("devices", 1)


def _cell(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value is not None and base else ""


def _md(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


STEP_HEADER = ["row", "step s", "tokens/s", "MFU", "peak memory", "planned memory",
               "compile s", "tokens/s vs base", "peak vs base"]


def step_table(rows: list[dict]) -> list[str]:
    """One markdown table per config: each step row beside the config's base row."""
    lines = []
    for config, group in _by_config(rows).items():
        base = _base_of(group)  # every row not failed has a base: itself at least
        where = f" ({base['devices']} x {base['device_kind']})" if base and "devices" in base else ""
        lines += ["", f"Step rows of `{config}`{where}:", "",
                  _md(STEP_HEADER), _md(["---"] * len(STEP_HEADER))]
        for r in group:
            if "error" in r:
                lines.append(_md([label(r), f"failed: {r['error']}"] + [""] * 7))
                continue
            peak = r.get("peak_memory")
            lines.append(_md([
                label(r), f"{r['step_s']:.3f}", f"{tokens_per_s(r):,.0f}",
                _cell(r.get("mfu") and 100 * r["mfu"], "{:.1f} %"),
                _cell(peak and peak / GIB, "{:.1f} GiB"),
                _cell(r.get("planned_memory") and r["planned_memory"] / GIB, "{:.1f} GiB"),
                _cell(r.get("compile_s"), "{:.1f}"),
                _ratio(tokens_per_s(r), tokens_per_s(base)),
                _ratio(peak, base.get("peak_memory"))]))
    return lines


GENERATION_HEADER = ["row", "batch", "prefill ms", "prefill TFLOP/s", "decode tokens/s",
                     "ms/token", "of bandwidth", "decode vs base"]


def generation_table(rows: list[dict]) -> list[str]:
    """One markdown table per config: each generation row beside the base row of its batch."""
    lines = []
    for config, group in _by_config(rows).items():
        bases = {}  # per batch size: as _base_of
        for r in sorted((r for r in group if "error" not in r), key=lambda r: label(r) != "base"):
            bases.setdefault(r["batch"], r)
        first = next((r for r in group if "error" not in r), None)
        if first is not None:
            lines += ["", f"Generation rows of `{config}` (prompts of {first['prompt_len']}, "
                      f"{first['new_tokens']} new tokens):"]
        else:
            lines += ["", f"Generation rows of `{config}`:"]
        lines += ["", _md(GENERATION_HEADER), _md(["---"] * len(GENERATION_HEADER))]
        for r in group:
            if "error" in r:
                lines.append(_md([label(r), "", f"failed: {r['error']}"] + [""] * 5))
                continue
            base = bases.get(r["batch"])
            lines.append(_md([
                label(r), str(r["batch"]), f"{r['prefill_s'] * 1e3:,.1f}",
                _cell(r.get("prefill_tflops"), "{:,.1f}"), f"{r['decode_tokens_per_s']:,.0f}",
                f"{r['time_per_output_token_s'] * 1e3:.2f}",
                _cell(r.get("bandwidth_share") and 100 * r["bandwidth_share"], "{:.0f} %"),
                _ratio(r["decode_tokens_per_s"], base and base["decode_tokens_per_s"])]))
    return lines


def report(rows: list[dict], unreadable: int = 0) -> list[str]:
    """The markdown of `rows`: the step tables, then the generation tables."""
    lines = step_table([r for r in rows if is_step(r)])
    lines += generation_table([r for r in rows if is_generation(r) and not is_step(r)])
    if unreadable:
        lines += ["", f"({unreadable} line(s) that were not JSON rows left out.)"]
    return lines


def loop_row(records: list[dict], after: int, config: str | None = None) -> dict:
    """A training run's logged speed as a step row: medians over the log intervals that end
    after step `after` (the first ones hold the compile and the warm-up)."""
    kept = [r for r in records if "step_s" in r and r.get("step", 0) > after]
    if not kept:
        raise UserError(f"no logged interval ends after step {after} in these metrics; lower "
                        "--after or log more often (train.log_every)")
    mfu = [r["mfu"] for r in kept if r.get("mfu") is not None]
    return {"command": "step", "config": config, "overrides": [],
            "variant": f"training loop, steps {after}-{kept[-1]['step']}",
            "step_s": statistics.median(r["step_s"] for r in kept),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept),
            "mfu": statistics.median(mfu) if mfu else None, "intervals": len(kept)}


def failed_row(command: str, error: str, config: str | None = None,
               overrides: list[str] | None = None, xla_flags: str = "") -> dict:
    """The row of a `python -m pjit_llm.bench COMMAND` run that failed with `error` (its
    last line, or why it was stopped)."""
    return {"command": command, "config": config, "overrides": list(overrides or []),
            "xla_flags": xla_flags.strip(), "error": error.strip() or "no message"}


# Kinds of device work, by kernel or op name (the first that matches).
KINDS = (("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
         ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|xmma|matmul|\bdot\b|dot[._]", re.I)),
         # by type, XLA's op names (all-gather.3, reduce_scatter.7) and NCCL's kernels alike:
         # a mixture of experts' exchange is its all-to-all, or its all-gather and reduce-scatter
         ("collective: all-to-all", re.compile(r"all[-_]?to[-_]?all|sendrecv", re.I)),
         ("collective: all-gather", re.compile(r"all[-_]?gather", re.I)),
         ("collective: reduce-scatter", re.compile(r"reduce[-_]?scatter", re.I)),
         ("collective: all-reduce", re.compile(r"all[-_]?reduce", re.I)),
         ("collective: other", re.compile(r"nccl|collective-permute", re.I)),
         ("copy or memset", re.compile(r"memcpy|memset|copy", re.I)))
# Lines that profiler tools derive from the kernels (counting them would count twice).
DERIVED_LINES = {"XLA Modules", "XLA Ops", "Steps", "XLA TraceMe", "Framework Name Scope",
                 "Framework Ops", "Source code", "Launch Stats"}


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(name)), "other (fusions)")


def device_events(profile) -> list[tuple[str, float]]:
    """(name, duration ns) of the device's work in a jax.profiler trace: the kernels on a
    GPU's (or TPU's) stream lines; on a CPU-only trace, the XLA ops its threads ran."""
    devices = [p for p in profile.planes if p.name.startswith("/device:")]
    if devices:
        lines = [line for p in devices for line in p.lines]
        streams = [line for line in lines if line.name.startswith("Stream")]
        lines = streams or [line for line in lines if line.name not in DERIVED_LINES]
        return [(e.name, e.duration_ns) for line in lines for e in line.events]
    found = []
    for line in (line for p in profile.planes if p.name.startswith("/host:") for line in p.lines):
        ops = sorted((e for e in line.events if any(k == "hlo_op" for k, _ in e.stats)),
                     key=lambda e: e.start_ns)
        # An op that holds others (a while loop around its body's ops) counts through them.
        found += [(e.name, e.duration_ns) for e, after in zip(ops, ops[1:] + [None])
                  if after is None or after.start_ns >= e.start_ns + e.duration_ns]
    return found


def trace_summary(directory: Path, top: int = 15) -> list[str]:
    """Markdown: the device time of the traces under `directory` by kind, and its `top`
    kernels (or ops) by total time."""
    from jax.profiler import ProfileData  # JAX's trace reader (optional: only this reads traces)

    files = sorted(directory.rglob("*.xplane.pb"))
    if not files:
        raise UserError(f"no jax.profiler trace (*.xplane.pb) under {directory}")
    events = [e for f in files for e in device_events(ProfileData.from_file(str(f)))]
    total = sum(d for _, d in events)
    if not total:
        raise UserError(f"the traces under {directory} hold no device work")
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, duration in events:
        by_name[name].append(duration)
    kinds: dict[str, float] = collections.Counter()
    for name, durations in by_name.items():
        kinds[kind(name)] += sum(durations)
    lines = [f"Device time in {len(files)} trace(s) under `{directory.name}`: "
             f"{total / 1e6:,.1f} ms in {len(events):,} kernels or ops.", "",
             _md(["kind", "ms", "share"]), _md(["---"] * 3)]
    lines += [_md([k, f"{t / 1e6:,.1f}", f"{100 * t / total:.1f} %"])
              for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["", _md(["kernel or op", "kind", "calls", "ms", "share"]), _md(["---"] * 5)]
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    lines += [_md([name if len(name) <= 90 else name[:87] + "...", kind(name), str(len(d)),
                   f"{sum(d) / 1e6:,.2f}", f"{100 * sum(d) / total:.1f} %"])
              for name, d in ranked]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.bench_report",
                                description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="markdown tables of saved rows, each beside its base")
    t.add_argument("files", nargs="+", type=Path)
    lp = sub.add_parser("loop", help="a training run's logged speed as one JSON step row")
    lp.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    lp.add_argument("--after", type=int, default=0, help="leave out intervals up to this step")
    lp.add_argument("--config", help="the config the run used (groups the row with its rows)")
    f = sub.add_parser("failed", help="a JSON row recording a benchmark command that failed")
    f.add_argument("--bench", choices=("step", "generate"), required=True,
                   help="the benchmark that failed")
    f.add_argument("--error", required=True, help="what went wrong (its last line)")
    f.add_argument("--config")
    f.add_argument("--xla-flags", default="", help="the XLA_FLAGS it ran with")
    f.add_argument("overrides", nargs="*", metavar="key.sub=value", help="after the options")
    tr = sub.add_parser("trace", help="where a profiled step's device time goes")
    tr.add_argument("directory", type=Path)
    tr.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    if args.command == "table":
        print("\n".join(report(*read_rows(args.files))).strip())
    elif args.command == "failed":
        print(json.dumps(failed_row(args.bench, args.error, args.config, args.overrides,
                                    args.xla_flags)))
    elif args.command == "loop":
        records, _ = read_rows([args.metrics])
        print(json.dumps(loop_row(records, args.after, args.config)))
    else:
        print("\n".join(trace_summary(args.directory, args.top)))


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
