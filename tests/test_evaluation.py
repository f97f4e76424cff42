"""Held-out evaluation: the mean loss over every predicted token of the fixed batches (not the
mean of the batches' means), as perplexity and, for byte-level tokens, bits per byte."""

import math

import jax
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.inference.evaluation import evaluate


def test_the_mean_is_over_tokens_not_batches():
    parts = build_on(tiny_config())
    params = parts.init_state().params
    rng = np.random.default_rng(0)
    rows = []
    for filled in (32, 8, 0):  # a full batch, one mostly padding, one all padding
        segment_ids = np.zeros((16, 32), np.int32)
        segment_ids[:, :filled] = 1
        rows.append({"tokens": rng.integers(0, 256, (16, 32)).astype(np.int32),
                     "segment_ids": segment_ids,
                     "positions": np.tile(np.arange(32, dtype=np.int32), (16, 1))})
    batches = [jax.device_put(b, parts.batch_sharding) for b in rows]
    sums = [parts.eval_step(params, b) for b in batches]
    loss_sum = sum(float(s["loss_sum"]) for s in sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    assert [float(s["tokens"]) for s in sums] == [16 * 31, 16 * 7, 0]
    result = evaluate(parts.eval_step, params, batches, byte_level=True)
    assert result["eval_loss"] == pytest.approx(loss_sum / tokens)
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_loss"]))
    assert result["eval_bits_per_byte"] == pytest.approx(result["eval_loss"] / math.log(2))
    assert "eval_bits_per_byte" not in evaluate(parts.eval_step, params, batches[:1], False)
