"""`python -m pjit_llm.generate --run DIR --prompt TEXT [--prompt TEXT ...] [--quantize int8] [options] [key=value ...]`

Text from a training checkpoint or an export (pjit_llm/inference/generator.py), with a
key/value cache: the prompts are run once (prefill), then a compiled loop on the device decodes
every further token. Greedy, or sampled with a temperature, top-k and top-p, from a seed; stops
at the end-of-document token or after --max-new-tokens. Parameters and cache live on the mesh
of mesh.* (heads over `tensor`, prompts over `data`), so a model that only fits sharded still
generates. With one prompt the text streams as it is produced, a few tokens at a time.
`--quantize int8` quantizes the weights to int8 as they are loaded (pjit_llm/models/quantize.py);
an export written with --quantize int8 is int8 already. `--chat` treats each prompt as a
user's message: it is rendered with the chat template of the run's tokenizer (with the
generation prompt), and the reply alone is printed.
"""

from pathlib import Path

from pjit_llm import xla_flags
from pjit_llm.command_line import command_parser, emulated
from pjit_llm.errors import UserError, run_cli
from pjit_llm.inference.generator import Sampling, generate_texts
from pjit_llm.models.quantize import check_quantize


def main(argv=None) -> None:
    p = command_parser("python -m pjit_llm.generate", __doc__,
                       "changes to the run's config, e.g. mesh.tensor=4")
    p.add_argument("--run", required=True, type=Path,
                   help="the training run directory, or an export (pjit_llm.export)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", default="none", metavar="none|int8",
                   help="int8: weight-only int8, quantized at load time")
    p.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template to each prompt (a user's message)")
    args = p.parse_intermixed_args(argv)
    check_quantize(args.quantize)
    xla_flags.apply_defaults()
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line for line in args.prompts_file.read_text().splitlines() if line]
        except OSError as e:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
    if not prompts:
        raise UserError("give a --prompt or a --prompts-file")
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and "
                        "0 < --top-p <= 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    texts = generate_texts(args.run, prompts, args.max_new_tokens, sampling, args.step,
                           emulated(args), stream=len(prompts) == 1,
                           quantize=args.quantize, chat=args.chat)
    if len(prompts) > 1:
        for prompt, text in zip(prompts, texts):
            print(f"=== {prompt}\n{'' if args.chat else prompt}{text}\n")


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
