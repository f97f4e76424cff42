"""Held-out evaluation: the mean next-token loss over fixed validation batches, as perplexity
and (for byte-level tokens) bits per byte. Training evaluates this way at its intervals, and
`evaluate_run` does the same for a run directory's checkpoint on any mesh. `make_score_step`
scores chosen tokens of each row (the log-likelihoods that benchmark harnesses ask for)."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import inference_params
from pjit_llm.data.datasets import open_data
from pjit_llm.data.loader import eval_batches
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.metrics import info
from pjit_llm.models.loss import make_eval_step
from pjit_llm.parallel.mesh import describe
from pjit_llm.placement import place
from pjit_llm.startup import started


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


def make_score_step(graphdef, layout):
    """The jitted step (params, tokens_BL, targets_BL, weights_BL) -> (logprob_B, greedy_B):
    per row, the summed log-probability of the targets where `weights` is set (position i
    predicts targets[i]) and whether every one of them is the most likely token. Rows are
    right-padded, so padding comes after every scored position and changes nothing; the
    caller keeps (B, L) to a few fixed shapes so that the step compiles once for each."""
    def score(params, tokens_BL, targets_BL, weights_BL):
        model = nnx.merge(graphdef, params)
        positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32),
                                        tokens_BL.shape)
        logits_BLV = model(tokens_BL, jnp.ones_like(tokens_BL), positions_BL).astype(jnp.float32)
        target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
        logprob_BL = target_BL - jax.nn.logsumexp(logits_BLV, axis=-1)
        greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
        return (jnp.sum(jnp.where(weights_BL, logprob_BL, 0.0), axis=1),
                jnp.all(greedy_BL | ~weights_BL, axis=1))

    return jax.jit(score, out_shardings=layout.replicated())


def evaluate_run(run: Path, step: int | None = None, batches: int | None = None, overrides=(),
                 quantize: str = "none") -> tuple[int, dict]:
    """(step, figures) of the run directory's (or export's) checkpoint `step` (default the
    latest) on the validation batches of its config with `overrides` (default
    train.eval_batches of them); with quantize="int8", of its weights quantized to int8."""
    cfg = run_config(run, overrides)
    with started(cfg, {"evaluate.step": step, "evaluate.batches": batches,
                       "evaluate.quantize": quantize}):
        dataset, tokenizer = open_data(cfg.data)
        placed = place(cfg, tokenizer.vocab_size)
        info(describe(placed.mesh))
        params, step, model = inference_params(placed.cfg, placed.layout, step, quantize)
        params = placed.to_run_order(params)
        eval_step = placed.eval_step  # compiled for float parameters; int8 ones need their own
        if model.quantize != "none":
            eval_step = jax.jit(make_eval_step(placed.graphdef, placed.balance),
                                out_shardings=placed.layout.replicated())
        val = eval_batches(dataset, tokenizer, cfg.data, placed.batch_sharding,
                           batches or cfg.train.eval_batches)
        return step, evaluate(eval_step, params, val, isinstance(tokenizer, ByteTokenizer))
