import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from pjit_llm.config import OptimizerConfig
from pjit_llm.errors import UserError
from pjit_llm.models.llama.model import LlamaTransformer as Transformer
from pjit_llm.training.optim import decay_mask, make_optimizer, make_schedule, schedule_change


def test_warmup_then_cosine_to_the_floor():
    sched = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(55)) == pytest.approx(0.55, abs=0.01)  # halfway down the cosine
    assert float(sched(100)) == pytest.approx(0.1)


def test_constant_schedule_after_warmup():
    sched = make_schedule(OptimizerConfig(lr=2.0, warmup_steps=4, schedule="constant"), 100)
    assert [float(sched(s)) for s in (0, 2, 4, 50, 99)] == [0.0, 1.0, 2.0, 2.0, 2.0]


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(UserError, match="warmup_steps=50 must be smaller than train.steps=50"):
        make_schedule(OptimizerConfig(warmup_steps=50), 50)


def test_weight_decay_skips_norms(tiny):
    model = nnx.eval_shape(lambda: Transformer(tiny().model, None, nnx.Rngs(0)))
    mask = nnx.split(model)[1]
    flags = {jax.tree_util.keystr(p, simple=True, separator="."): bool(v)
             for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(mask))}
    assert flags == {"blocks.attn.wq.value": True, "blocks.attn.wk.value": True,
                     "blocks.attn.wv.value": True, "blocks.attn.wo.value": True,
                     "blocks.mlp.w_gate.value": True, "blocks.mlp.w_up.value": True,
                     "blocks.mlp.w_down.value": True, "embed.value": True,
                     "blocks.attn_norm.scale.value": False, "blocks.mlp_norm.scale.value": False,
                     "final_norm.scale.value": False}


def test_decay_shrinks_matrices_but_not_norms(tiny):
    # With zero gradients, AdamW's update is pure weight decay.
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, schedule="constant")
    params = nnx.split(Transformer(tiny().model, None, nnx.Rngs(params=0)))[1]
    tx = make_optimizer(cfg, make_schedule(cfg, 10))
    # One compiled update (op by op, an optimizer over every parameter is slow to dispatch).
    zeros = jax.tree.map(np.zeros_like, params)
    updates = jax.jit(lambda z, p: tx.update(z, tx.init(p), p)[0])(zeros, params)
    np.testing.assert_allclose(updates["embed"][...], -0.05 * params["embed"][...], rtol=1e-6)
    assert not np.any(updates["final_norm"]["scale"][...])


def test_extending_a_run_keeps_the_old_tail_or_starts_a_new_schedule():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    old = make_schedule(cfg, 300)
    stretched = make_schedule(cfg, 400)
    assert float(stretched(300)) > 0.2 > float(old(300))  # the default stretches the cosine
    tail = make_schedule(dataclasses.replace(cfg, decay_steps=300), 400)
    for step in (0, 5, 150, 300, 350, 400):
        assert float(tail(step)) == pytest.approx(float(old(min(step, 300))))
    new = make_schedule(dataclasses.replace(cfg, schedule_start=300), 400)
    for step in (0, 5, 150, 299):
        assert float(new(step)) == pytest.approx(float(old(step)))
    assert float(new(300)) == 0.0 and float(new(310)) == pytest.approx(1.0)
    assert float(new(400)) == pytest.approx(0.1)


def test_a_resume_that_moves_the_learning_rate_says_so_and_offers_both_choices():
    cfg = OptimizerConfig(lr=3e-4, warmup_steps=20)
    line = schedule_change(cfg, 300, cfg, 400, 300)
    assert "from 3.00e-05 to" in line and "ends at step 400 (it ended at 300)" in line
    assert "optimizer.decay_steps=300" in line and "optimizer.schedule_start=300" in line
    assert schedule_change(cfg, 300, cfg, 300, 300) is None
    assert schedule_change(cfg, 300, dataclasses.replace(cfg, decay_steps=300), 400, 300) is None
    chosen = schedule_change(cfg, 300, dataclasses.replace(cfg, schedule_start=300), 400, 300)
    assert "to 0.00e+00" in chosen and "optimizer." not in chosen
    with pytest.raises(UserError, match="warmup_steps=20 must be smaller than train.steps=300 less optimizer.schedule_start=290"):
        make_schedule(dataclasses.replace(cfg, schedule_start=290), 300)
