"""The step measurement: the real sharded step, its state sizes and FLOP accounting."""

import pytest

from pjit_llm.models.llama import flops as llama_flops
from pjit_llm.training.measure import measure


def test_step_measurement_is_the_real_sharded_step(tiny):
    cfg = tiny("mesh.data=1", "mesh.fsdp=8")
    row = measure(cfg, steps=2, warmup=1)
    n_params = row["params"]
    assert n_params == llama_flops.matmul_params(cfg.model) + 2 * 64 * 2 + 64  # + the norm scales
    assert row["tokens_per_step"] == 16 * 32 and row["devices"] == 8
    assert 5.0 < row["loss"] < 7.0  # about ln(384) for random tokens: the model really ran
    # FSDP over 8 devices: each holds an eighth of parameters and both Adam moments (4 bytes
    # each), up to the small replicated step counters.
    full = 3 * 4 * n_params
    assert full / 8 <= row["state_bytes_per_device"] <= 1.05 * full / 8
    flops = llama_flops.train_flops_per_token(cfg.model, 32) * 512 / row["step_s"] / 8 / 1e12
    assert row["tflops_per_device"] == pytest.approx(flops)
    assert row["mfu"] is None and row["peak_memory"] > 0 and row["planned_memory"] > 0


def test_synthetic_tokens_avoid_the_ids_that_pad_the_vocabulary(tiny):
    """The byte tokenizer's 257 tokens padded to 384: a target among the 127 padding ids, whose
    logits the loss masks out, made the loss infinite."""
    cfg = tiny("model.vocab_size=0", "model.num_layers=1")
    row = measure(cfg, steps=1, warmup=0)
    assert 5.0 < row["loss"] < 6.5  # about ln(257)

