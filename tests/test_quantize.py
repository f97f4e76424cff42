"""int8 weight-only quantization: the round trip is within half a step of each channel's scale;
quantized parameters keep the rules' shardings and take about half the bytes of bfloat16; a
trained model's held-out loss barely moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.errors import UserError
from pjit_llm.models.families import abstract_model
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS
from pjit_llm.models.quantize import (Int8Weight, check_quantize, dequantize, param_bytes,
                                      quantize, quantize_params)
from pjit_llm.models.loss import make_eval_step


@pytest.mark.parametrize("shape, contracted", [
    ((64, 8, 16), (0,)),  # wq: (embed, heads, head_dim), one scale per head and head dim
    ((8, 16, 64), (0, 1)),  # wo: contracts heads and head dim, one scale per output width
    ((3, 128, 64), (1,)),  # stacked w_down: (layers, mlp, embed)
])
def test_round_trip_error_is_at_most_half_a_step_per_channel(shape, contracted):
    w = jax.random.normal(jax.random.key(0), shape) * jnp.exp(
        jax.random.normal(jax.random.key(1), shape))  # heavy tails: channels differ in range
    w = w.at[(slice(None),) * (len(shape) - 1) + (0,)].set(0.0)  # an all-zero channel
    q = quantize(w, contracted)
    kept = tuple(s for i, s in enumerate(shape) if i not in contracted)
    assert q.values.dtype == jnp.int8 and q.values.shape == shape
    assert q.scale.dtype == jnp.float32 and q.scale.shape == kept
    scale = np.expand_dims(np.asarray(q.scale), contracted)
    error = np.abs(np.asarray(w) - np.asarray(dequantize(q, contracted)))
    assert np.all(error <= scale / 2 * (1 + 1e-6))
    assert np.all(np.abs(np.asarray(q.values)) <= 127)
    # each nonzero channel's largest magnitude maps onto 127: the full int8 range is used
    peak = np.max(np.abs(np.asarray(q.values, np.int32)), axis=contracted)
    assert np.all(peak[np.asarray(q.scale) > 0] == 127)
    assert np.all(np.asarray(dequantize(q, contracted))[..., 0] == 0)


def _quantized(cfg, **mesh):
    parts = build_on(cfg, **mesh)
    params = parts.init_state().params
    _, abstract = abstract_model(parts.model, parts.layout)
    return parts, params, quantize_params(params, parts.layout, QUANTIZED_WEIGHTS, abstract)


def test_quantized_parameters_keep_the_rules_shardings_and_half_the_bytes():
    parts, params, q = _quantized(tiny_config("model.tie_embeddings=false"),
                                  data=2, fsdp=2, tensor=2)
    layout = parts.layout
    wo = q["blocks"]["attn"]["wo"][...]
    assert isinstance(wo, Int8Weight)
    assert wo.values.sharding.spec == layout.spec(("layers", "heads", "head_dim", "embed"))
    assert wo.scale.sharding.spec == layout.spec(("layers", "embed"))
    w_up = q["blocks"]["mlp"]["w_up"][...]
    assert w_up.scale.shape == (2, 128) and w_up.scale.sharding.spec == layout.spec(("layers", "mlp"))
    embed = q["embed"][...]  # one scale per token row
    assert embed.scale.shape == (384,) and embed.scale.sharding.spec == layout.spec(("vocab",))
    assert q["final_norm"]["scale"][...].dtype == jnp.float32  # norms stay float
    bf16 = param_bytes(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    ratio = param_bytes(q) / bf16
    assert 0.5 < ratio < 0.55, ratio  # int8 values, float32 scales and norms


def test_bad_options_are_refused_in_one_line():
    assert check_quantize("int8") == "int8" and check_quantize("none") == "none"
    with pytest.raises(UserError, match="^--quantize int4 is not supported; use none or int8$"):
        check_quantize("int4")


@pytest.fixture(scope="module")
def trained():
    """A tiny model (untied embeddings) trained for 60 steps to continue counting sequences in
    which a quarter of the tokens are noise (so its loss stays well above zero), and held-out
    batches of counts it never saw (other starting points)."""
    cfg = tiny_config("optimizer.lr=1e-2", "train.steps=60", "model.tie_embeddings=false")
    parts = build_on(cfg, fsdp=2, tensor=2)
    state, rng = parts.init_state(), np.random.default_rng(0)

    def batch(starts):
        tokens = starts + np.arange(32)
        noise = rng.random(tokens.shape) < 0.25
        tokens = np.where(noise, rng.integers(0, 384, tokens.shape), tokens)
        return jax.device_put({"tokens": tokens.astype(np.int32),
                               "segment_ids": np.ones((16, 32), np.int32),
                               "positions": np.tile(np.arange(32, dtype=np.int32), (16, 1))},
                              parts.batch_sharding)

    for _ in range(60):
        state, _ = parts.train_step(state, batch(2 * rng.integers(0, 150, (16, 1))))
    held_out = [batch(2 * rng.integers(0, 150, (16, 1)) + 1) for _ in range(4)]  # odd starts
    return parts, state.params, held_out


def test_a_trained_models_held_out_loss_moves_by_under_half_a_percent(trained):
    parts, params, held_out = trained
    _, abstract = abstract_model(parts.model, parts.layout)
    q = quantize_params(params, parts.layout, QUANTIZED_WEIGHTS, abstract)
    int8_step = jax.jit(make_eval_step(parts.graphdef))

    def mean_loss(step, p):
        sums = [step(p, b) for b in held_out]
        return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)

    base, int8 = mean_loss(parts.eval_step, params), mean_loss(int8_step, q)
    assert base < 4.0  # it learned to count: guessing among 384 tokens costs 5.95 nats: the comparison means something
    assert abs(int8 - base) <= 0.005 * base, (base, int8)  # measured: 3.0631 and 3.0631
    assert int8 != base  # the quantized weights are what ran
