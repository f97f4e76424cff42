"""The training loop's periodic actions, each alone: metrics reading, the non-finite loss
message, the in-flight bound, evaluation with samples, profiling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_on, tiny_config
from pjit_llm.errors import UserError
from pjit_llm.metrics import MetricsLog
from pjit_llm.training.actions import InFlight, MetricsReader, Profiler, non_finite_message
from pjit_llm.training.preemption import MAX_IN_FLIGHT, STOP_MARGIN


def _metrics(loss: float) -> dict:
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0), "lr": jnp.float32(1e-3),
            "tokens": jnp.float32(10)}


def _checkpoints(tmp_path):
    from pjit_llm.checkpoint.manager import Checkpoints
    from pjit_llm.config import CheckpointConfig
    return Checkpoints(tmp_path / "checkpoints", CheckpointConfig())


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_are_read_only_when_asked_and_averaged_over_the_interval(tmp_path):
    log = MetricsLog(tmp_path)
    reader = MetricsReader(tiny_config(), log, flops_per_step=1e9, tokens_per_step=512,
                           first_step=0, ckpts=_checkpoints(tmp_path))
    for step, loss in ((1, 4.0), (2, 2.0)):
        reader.add(step, _metrics(loss))
    reader.read(log_it=False)  # read (checked for non-finite losses) but not logged
    assert not (tmp_path / "metrics.jsonl").read_text()
    reader.add(3, _metrics(3.0))
    reader.add(4, _metrics(1.0))
    reader.read(log_it=True)
    log.close()
    [record] = _records(tmp_path)
    assert record["step"] == 4 and record["loss"] == 2.0  # the mean of steps 3 and 4
    assert record["tokens_per_s"] > 0 and record["tflops_per_device"] > 0
    assert reader.last == record


def test_a_mixture_of_experts_logs_its_router_metrics_over_the_interval(tmp_path):
    log = MetricsLog(tmp_path)
    reader = MetricsReader(tiny_config("model.family=mixtral"), log, 1e9, 512, 0,
                           _checkpoints(tmp_path))
    for step, aux, most in ((1, 1.5, 30.0), (2, 1.1, 20.0)):
        reader.add(step, {**_metrics(3.0), "moe_aux_loss": jnp.float32(aux),
                          "router_z_loss": jnp.float32(4.0),
                          "expert_tokens_max": jnp.float32(most),
                          "expert_tokens_mean": jnp.float32(16.0)})
    reader.read(log_it=True)
    log.close()
    [record] = _records(tmp_path)
    assert (record["moe_aux_loss"], record["router_z_loss"], record["expert_tokens_max"],
            record["expert_tokens_mean"]) == pytest.approx((1.3, 4.0, 25.0, 16.0))


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path):
    log = MetricsLog(tmp_path)
    reader = MetricsReader(tiny_config(), log, 1e9, 512, 0, _checkpoints(tmp_path))
    reader.add(21, _metrics(3.0))
    reader.add(22, _metrics(float("nan")))
    with pytest.raises(UserError, match="not finite at step 22; lower optimizer.lr"):
        reader.read(log_it=False)
    log.close()
    skipping = MetricsReader(tiny_config("train.max_bad_steps=1"), MetricsLog(tmp_path), 1e9,
                             512, 0, _checkpoints(tmp_path))
    skipping.add(1, _metrics(float("inf")))
    skipping.read(log_it=True)  # one bad step allowed: logged, with the count
    assert skipping.last["skipped_steps"] == 1 and skipping.last["loss"] == float("inf")
    assert "lower optimizer.lr" in non_finite_message(5, None, [], tmp_path)


def test_in_flight_steps_are_bounded_and_the_stop_margin_exceeds_the_bound():
    queue = InFlight(bounded=True, limit=3)
    for i in range(10):
        queue.add(jnp.float32(i))
    assert len(queue.queue) == 3
    unbounded = InFlight(bounded=False)
    unbounded.add(jnp.float32(0))
    assert not unbounded.queue
    assert STOP_MARGIN > MAX_IN_FLIGHT


def test_profiler_traces_exactly_the_configured_steps(tmp_path):
    profiler = Profiler((2, 3), tmp_path / "profile")
    x = jnp.ones((8, 8))
    for step in range(1, 5):
        profiler.before(step)
        assert profiler.tracing == (step in (2, 3))
        x = x @ x / 8
        profiler.after(step, x)
    assert not profiler.tracing
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_evaluation_is_due_at_its_interval_and_at_the_end():
    from pjit_llm.training.actions import Evaluation
    cfg = tiny_config("train.eval_every=4", "train.steps=10")
    due = Evaluation(cfg, None, [], None, None, None, True).due
    assert [s for s in range(1, 11) if due(s)] == [4, 8, 10]


def test_evaluation_writes_the_held_out_loss_and_samples(tmp_path):
    from pjit_llm.data.tokenizer import ByteTokenizer
    from pjit_llm.inference.generator import Generator, Sampling
    from pjit_llm.training.actions import Evaluation
    cfg = tiny_config("train.sample_tokens=5", "model.vocab_size=384")
    parts = build_on(cfg)
    params = parts.init_state().params
    rows = np.tile(np.arange(32, dtype=np.int32), (16, 1))
    batch = jax.device_put({"tokens": rows, "segment_ids": np.ones_like(rows), "positions": rows},
                           parts.batch_sharding)
    log = MetricsLog(tmp_path)
    generator = Generator(parts.model, parts.layout, Sampling())
    result = Evaluation(parts.cfg, parts.eval_step, [batch], ByteTokenizer(), log, generator,
                        byte_level=True)(params, 7)
    log.close()
    assert result["eval_loss"] == pytest.approx(np.log(384), rel=0.05)  # a fresh model: uniform
    assert _records(tmp_path) == [{"step": 7, **result}]
    assert (tmp_path / "tensorboard").is_dir()


def test_non_finite_message_suspects_a_just_resumed_checkpoint(tmp_path):
    # The fault drill: resumed from step 30 (damaged), non-finite at step 32.
    line = non_finite_message(32, 30, [20, 25, 30], tmp_path)
    assert line == (f"the training loss was not finite at step 32, 2 steps after resuming from "
                    f"checkpoint step 30 in {tmp_path}: that checkpoint may be damaged; move step "
                    f"30 out of {tmp_path} (or set checkpoint.directory to a copy without it) to "
                    "resume from step 25")
    assert "lower optimizer.lr" not in line
    # Checkpoints saved since the resume come from the suspect state too.
    assert "move steps 30, 31 out of" in non_finite_message(33, 30, [25, 30, 31], tmp_path)
    assert "no earlier checkpoint is kept" in non_finite_message(31, 30, [30], tmp_path)
    # Long after a resume, or in a fresh run, the learning rate is the suspect.
    for resumed, bad in ((30, 100), (None, 3)):
        line = non_finite_message(bad, resumed, [25, 30], tmp_path)
        assert f"the last good checkpoint is step 30 in {tmp_path}; lower optimizer.lr" in line
    assert non_finite_message(3, None, [], tmp_path) == (
        "the training loss was not finite at step 3; lower optimizer.lr, raise "
        "optimizer.warmup_steps, or allow skipping with train.max_bad_steps")

