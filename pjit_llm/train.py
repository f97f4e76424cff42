"""`python -m pjit_llm.train [--config FILE] [--emulate-devices N] [key.sub=value ...]`

Trains (or resumes) the configured run: see pjit_llm/training/loop.py for the loop and
pjit_llm/training/build.py for how the config becomes a mesh, a model and compiled steps.
"""

import argparse

from pjit_llm.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file (default: the built-in tiny CPU config)")
    p.add_argument("--emulate-devices", type=int, default=0, metavar="N",
                   help="train on N emulated CPU devices (sets mesh.emulate_devices)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> None:
    from pjit_llm import xla_flags
    xla_flags.apply_defaults()
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.emulate_devices:
        overrides.append(f"mesh.emulate_devices={args.emulate_devices}")

    from pjit_llm.config import load_config
    from pjit_llm.metrics import info, require_wandb
    from pjit_llm.parallel import distributed
    from pjit_llm.parallel.mesh import use_emulated_devices
    from pjit_llm.training.build import open_data
    from pjit_llm.training.loop import train

    cfg = load_config(args.config, overrides)
    if cfg.train.wandb_project:
        require_wandb()  # on every process, before any work: they all stop alike
    if cfg.model.quantize != "none":
        raise UserError(f"model.quantize={cfg.model.quantize} describes quantized parameters, which "
                        "only evaluate and generate read; train with model.quantize=none")
    use_emulated_devices(cfg.mesh.emulate_devices)
    topology = distributed.initialize(cfg)
    try:
        info(distributed.describe(topology))
        dataset, tokenizer = open_data(cfg)
        train(cfg, dataset, tokenizer)
    finally:
        distributed.shutdown()  # train() has closed the checkpoints and the data


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
