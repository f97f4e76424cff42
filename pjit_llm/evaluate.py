"""`python -m pjit_llm.evaluate --run DIR [--step S] [--batches N] [--emulate-devices N] [key=value ...]`

Restores a training checkpoint onto the current devices (any mesh: override mesh.*) and
reports the held-out loss, perplexity and, for byte-level tokens, bits per byte: the same
figures, on the same validation batches, as the evaluation during training. Overrides
apply to the run's recorded config (for instance another data.val_split).
"""

import argparse
import json
import math
from pathlib import Path

from pjit_llm.errors import UserError, run_cli


def evaluate(eval_step, params, batches: list, byte_level: bool) -> dict:
    """Mean loss over all predicted tokens of the fixed validation batches."""
    totals = [eval_step(params, batch) for batch in batches]
    loss_sum = sum(float(t["loss_sum"]) for t in totals)
    count = sum(float(t["tokens"]) for t in totals)
    loss = loss_sum / max(count, 1.0)
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}
    if byte_level:  # one token per byte (document ends aside): nats/token -> bits/byte
        result["eval_bits_per_byte"] = loss / math.log(2)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="the training run directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--batches", type=int, help="validation batches (default: train.eval_batches)")
    p.add_argument("--emulate-devices", type=int, default=0, metavar="N")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_intermixed_args(argv)
    from pjit_llm import xla_flags
    xla_flags.apply_defaults()

    import jax

    from pjit_llm import distributed
    from pjit_llm.attention import resolve_attention
    from pjit_llm.data.loader import eval_batches
    from pjit_llm.data.tokenizer import ByteTokenizer, load_tokenizer
    from pjit_llm.export import restore_params, run_config
    from pjit_llm.data.sources import prepare_shared
    from pjit_llm.mesh import describe, make_mesh, use_emulated_devices
    from pjit_llm.metrics import info
    from pjit_llm.sharding import Layout
    from pjit_llm.train_step import abstract_model, make_eval_step

    cfg = run_config(args.run, args.overrides, args.emulate_devices)
    use_emulated_devices(cfg.mesh.emulate_devices)
    if args.batches is not None and args.batches < 1:
        raise UserError("--batches must be at least 1")
    distributed.initialize(cfg.distributed)
    try:
        dataset = prepare_shared(cfg.data)
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path, dataset.directory)
        layout = Layout(make_mesh(cfg.mesh), cfg.mesh.rules)
        info(describe(layout.mesh))
        params, step = restore_params(cfg, layout, args.step)
        graphdef, _ = abstract_model(resolve_attention(cfg.model, cfg.data.seq_len), layout)
        batch_sharding = layout.sharding(("batch", "length"))
        eval_step = jax.jit(make_eval_step(graphdef), out_shardings=layout.replicated())
        batches = eval_batches(dataset, tokenizer, cfg.data, batch_sharding,
                               args.batches or cfg.train.eval_batches)
        result = evaluate(eval_step, params, batches, isinstance(tokenizer, ByteTokenizer))
    finally:
        distributed.shutdown()
    info(json.dumps({"step": step, **result}))


if __name__ == "__main__":
    run_cli(main)
