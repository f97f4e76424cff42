"""`python -m pjit_llm.train [--config FILE] [--emulate-devices N] [key.sub=value ...]`

Trains (or resumes) the configured run: see pjit_llm/training/loop.py for the loop and
pjit_llm/training/build.py for how the config becomes a mesh, a model and compiled steps.
"""

from pjit_llm import xla_flags
from pjit_llm.checkpoint.run_dir import train_config
from pjit_llm.command_line import command_parser, emulated
from pjit_llm.data.datasets import open_data
from pjit_llm.errors import UserError, run_cli
from pjit_llm.metrics import info, require_wandb
from pjit_llm.parallel import distributed
from pjit_llm.startup import started
from pjit_llm.training.build import check
from pjit_llm.training.loop import train


def main(argv=None) -> None:
    xla_flags.apply_defaults()
    p = command_parser("python -m pjit_llm.train", __doc__)
    p.add_argument("--config", help="YAML file (default: the built-in tiny CPU config)")
    args = p.parse_intermixed_args(argv)
    cfg = train_config(args.config, emulated(args))
    if cfg.train.wandb_project:
        require_wandb()  # on every process, before any work: they all stop alike
    if cfg.model.quantize != "none":
        raise UserError(f"model.quantize={cfg.model.quantize} describes quantized parameters, which "
                        "only evaluate and generate read; train with model.quantize=none")
    with started(cfg) as topology:
        info(distributed.describe(topology))
        check(cfg)  # a mistake in the config stops the run before the data is prepared
        dataset, tokenizer = open_data(cfg.data)
        train(cfg, dataset, tokenizer)  # closes its checkpoints and data before the shutdown


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
