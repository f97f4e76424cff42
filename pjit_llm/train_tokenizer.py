"""`python -m pjit_llm.train_tokenizer train [--config FILE] [--vocab-size N] [key.sub=value ...]`

Trains a SentencePiece model on the configured corpus (one source or a mixture, prepared on
first use) and saves it beside the prepared data, where `data.tokenizer=sentencepiece` finds it.
"""

import argparse
from pathlib import Path

from pjit_llm.config import load_config
from pjit_llm.data.datasets import prepare
from pjit_llm.data.sources import read_texts
from pjit_llm.data.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer, train_sentencepiece
from pjit_llm.errors import UserError, run_cli


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.train_tokenizer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model on the configured corpus")
    t.add_argument("--config", help="YAML config whose data section names the corpus")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--max-texts", type=int, default=200_000, help="records to train on, at most")
    t.add_argument("--out", help=f"output file (default: {SENTENCEPIECE_FILE} beside the data)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if args.vocab_size < 8:
        raise UserError("--vocab-size must be at least 8")
    cfg = load_config(args.config, args.overrides)
    dataset = prepare(cfg.data)
    out = Path(args.out) if args.out else dataset.directory / SENTENCEPIECE_FILE
    # The prepared dataset names its own text field: local corpora store it as `text`
    # whatever data.text_field named in the input files.
    train_sentencepiece(read_texts(dataset.train, dataset.text_field), out, args.vocab_size,
                        args.model_type, args.max_texts)
    tok = SentencePieceTokenizer(str(out))
    print(f"wrote {out} ({tok.vocab_size} pieces); train with data.tokenizer=sentencepiece"
          + (f" data.tokenizer_path={out}" if args.out else ""))


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
