"""`python -m pjit_llm.plan --config F [--devices N --per-host H --device KIND] [key=value ...]`

Chooses the parallelism for a model, a cluster and a batch before renting it: candidate meshes
(every mesh axis, with dcn_* splits across hosts), remat policies, gradient accumulation,
pipeline micro-batches and repeats and loss chunking, pruned by arithmetic, the most promising
compiled ahead of time on emulated devices (nothing runs; XLA's memory plan rules out those over
budget), ranked by a step-time model (planning/estimate.py). `--out plan.yaml` writes the
chosen config, which `python -m pjit_llm.train --config plan.yaml` runs as it is.
`--calibrate N` runs N of the compiled candidates a few steps (planning/calibrate.py says which)
and reports predicted against measured.
Device kinds: h100, h200, a100, b200 (data sheets), cpu (this machine's emulated devices,
measured at start), or any from --device-file. Compiled analyses are cached
($PJIT_LLM_PLAN_CACHE, default ~/.cache/pjit_llm/plans; --cache DIR, --no-cache).
"""

import argparse
import dataclasses
import os
from pathlib import Path

from pjit_llm import xla_flags
from pjit_llm.command_line import add_shared
from pjit_llm.config import load_config
from pjit_llm.errors import UserError, run_cli
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.planning import devices as device_kinds
from pjit_llm.planning.calibrate import measured_rows
from pjit_llm.planning.candidates import REMATS, apply
from pjit_llm.planning.compiled import default_cache_dir
from pjit_llm.planning import planner
from pjit_llm.planning.planner import _progress, plan
from pjit_llm.planning.probe import measure_kind
from pjit_llm.planning.report import print_calibration, print_plan, write_plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.plan",
                                description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", help="YAML file (default: the built-in tiny CPU config)")
    p.add_argument("--devices", type=int, default=8, help="devices in the cluster")
    p.add_argument("--per-host", type=int, default=8, help="devices per host")
    p.add_argument("--device", default="cpu", help="device kind: cpu (emulated, measured here), "
                   f"{', '.join(device_kinds.KINDS)}, or one from --device-file")
    p.add_argument("--device-file", help="YAML of further device kinds (planning/devices.py)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of each device's memory left free (default 0.1)")
    p.add_argument("--top", type=int, default=0, help="candidates compiled (default 0: "
                   f"{planner.SMALL_TOP} for a GPU kind or a model under "
                   f"{planner.SMALL_MODEL:.0e} parameters, else {planner.LARGE_TOP})")
    p.add_argument("--remat", default=",".join(REMATS), help="remat policies to consider")
    p.add_argument("--out", help="write the chosen config here (YAML)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="run N compiled candidates a few steps: predicted against measured")
    p.add_argument("--steps", type=int, default=5, help="timed steps per calibration run")
    p.add_argument("--cache", type=Path, help="where compiled analyses are cached")
    p.add_argument("--no-cache", action="store_true", help="compile every candidate afresh")
    add_shared(p)
    return p


def main(argv=None) -> None:
    xla_flags.apply_defaults()
    args = _parser().parse_intermixed_args(argv)
    if args.emulate_devices is not None:
        raise UserError("plan sets its emulated devices from --devices; drop --emulate-devices")
    if args.top < 0 or args.calibrate < 0 or args.steps < 1 or not 0 <= args.headroom < 1:
        raise UserError("need --top >= 0, --calibrate >= 0, --steps >= 1, 0 <= --headroom < 1")
    kinds = dict(device_kinds.KINDS)
    if args.device_file:
        kinds.update(device_kinds.load_kinds(args.device_file))
    name = args.device.lower()
    if name != "cpu" and name not in kinds:
        raise UserError(f"--device {args.device} is not a known kind; use cpu, "
                        f"{', '.join(kinds)}, or describe it in --device-file")
    remats = tuple(r for r in args.remat.split(",") if r)
    real_devices = args.calibrate and name != "cpu"  # calibrate on this node's own devices
    if not real_devices:
        use_emulated_devices(args.devices)  # before JAX starts a backend: one count a process
    cfg = load_config(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, emulate_devices=args.devices if name == "cpu" else 0))
    import jax  # noqa: PLC0415  (after the device count is set)
    if len(jax.devices()) < args.devices:
        raise UserError(f"--devices {args.devices} but this process has {len(jax.devices())} "
                        f"{jax.default_backend()} devices; calibrate on a node that has them")
    if name == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / args.devices
        kind = measure_kind(jax.devices()[:args.devices], memory)
    else:
        kind = kinds[name]
    cluster = device_kinds.make_cluster(kind, args.devices, args.per_host)
    budget = kind.hbm_bytes * (1 - args.headroom)
    cache = None if args.no_cache else (args.cache or default_cache_dir())
    rows, info = plan(cfg, cluster, kind, budget, args.top, cache, remats)
    arithmetic = {w: n for w, n in info["pruned"].items() if not w.startswith("refused: ")}
    refused = {w: n for w, n in info["pruned"].items() if w.startswith("refused: ")}
    header = (f"plan for {cluster.describe()}, batch {cfg.data.batch_size} x {cfg.data.seq_len}: "
              f"{info['enumerated']:,} candidates after pruning, {info['compiled']} compiled "
              f"({info['cached']} cached); pruned: "
              + "; ".join(f"{why} ({n:,})" for why, n in sorted(arithmetic.items(),
                                                                key=lambda kv: -kv[1])[:4]))
    if refused:  # compiled and refused: the builder's or the compiler's reason
        header += "; " + "; ".join(f"{why} ({n})" for why, n in refused.items())
    print_plan(rows, header)
    if kind.flash_attention:
        print(f"memory/device: XLA's plan less its (seq, seq) attention buffers, which "
              f"{kind.name}'s flash kernel never allocates (measured per candidate by a second "
              f"compile at half the sequence and twice the batch; planning/compiled.py)")
    best = rows[0]
    print(f"chosen: {best['candidate'].describe_mesh()}, remat {best['candidate'].remat}, "
          f"{best['candidate'].describe_schedule()}: {best['estimate'].dominant} dominates "
          f"({', '.join(f'{k} {v:.3g} s' for k, v in best['estimate'].terms.items() if v)})")
    if args.out:
        chosen = apply(cfg, best["candidate"])
        write_plan(chosen, args.out, f"python -m pjit_llm.plan: {cluster.describe()}\n"
                   f"predicted step {best['estimate'].step_s:.4g} s, {best['estimate'].dominant} "
                   f"dominates; memory plan {best['memory'] / 2**30:.2f} GiB a device")
        print(f"wrote {args.out}")
    if args.calibrate:
        measured = measured_rows(rows, args.calibrate, args.steps, 2, _progress, budget)
        print_calibration(measured)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
