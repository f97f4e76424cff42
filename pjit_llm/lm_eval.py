"""`python -m pjit_llm.lm_eval --model_args run=DIR[,key=value...] --tasks TASK[,TASK...] [lm-eval's options]`

EleutherAI's lm-evaluation-harness (the `lm-eval` extra) with this package's backend
(pjit_llm/inference/lm_backend.py) registered under the name `pjit_llm`, which is also the
default --model here. Every other argument is lm-eval's own (--tasks, --num_fewshot,
--batch_size, --limit, --include_path, --output_path, --log_samples, ...). Importing this
module registers the backend for `lm_eval.simple_evaluate(model="pjit_llm", ...)` too.
"""

import sys

from pjit_llm import xla_flags
from pjit_llm.errors import UserError, run_cli

NAME = "pjit_llm"
BACKEND = "pjit_llm.inference.lm_backend:PjitLM"  # imported (with JAX) only when chosen
SUBCOMMANDS = ("run", "ls", "validate")


def register() -> bool:
    """Register the backend with lm-eval; False when lm-eval is not installed."""
    try:
        # lm-eval fills its registry with the built-in backends only while it is empty: fill it
        # first, or registering ours would hide them (hf, vllm, ...).
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if NAME not in model_registry:
        model_registry.register(NAME, target=BACKEND)
    return True


def main(argv=None) -> None:
    if not register():
        raise UserError("lm-eval is not installed: pip install 'pjit_llm[lm-eval]'")
    argv = list(sys.argv[1:] if argv is None else argv)
    command, args = (argv[0], argv[1:]) if argv and argv[0] in SUBCOMMANDS else ("run", argv)
    if command == "run" and not any(a in ("--model", "-M") or a.startswith("--model=")
                                    for a in args):
        args = ["--model", NAME, *args]
    xla_flags.apply_defaults()
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["python -m pjit_llm.lm_eval", command, *args]
    cli_evaluate()


def cli() -> None:
    """One-line errors, exit status 2."""
    run_cli(main)


register()

if __name__ == "__main__":
    cli()
