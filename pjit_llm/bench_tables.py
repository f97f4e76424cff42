"""The benchmark's tables: one layout per kind of measurement (pjit_llm.bench), filled from
the rows that training/measure.py and inference/speed.py return."""

from pjit_llm.metrics import human_bytes, human_count


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
    """The table of `command`'s rows (step, memory, generate, data or save)."""
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
