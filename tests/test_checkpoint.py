"""Checkpoints with real Orbax on disk and real processes and signals."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, run_cli, tiny_config
from pjit_llm.checkpoint.exports import load_params
from pjit_llm.checkpoint.manager import Checkpoints
from pjit_llm.config import CheckpointConfig, MeshConfig
from pjit_llm.parallel.layout import Layout
from pjit_llm.parallel.mesh import make_mesh
from pjit_llm.training.build import build
from pjit_llm.checkpoint import checksums
from pjit_llm.training.actions import non_finite_message

RUN = [*TINY, "train.log_every=1", "train.eval_every=0", "data.num_workers=2"]


def losses(run_dir) -> dict[int, list[float]]:
    """Every logged training loss by step (a resumed run logs some steps twice)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def steps_on_disk(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def cli(tmp_path, *args):
    return run_cli(*RUN, "train.run_dir=run", f"data.data_dir={tmp_path / 'data'}", *args,
                   cwd=tmp_path)


pytestmark = pytest.mark.slow


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    result = cli(tmp_path, "train.steps=8", "checkpoint.every=4")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert steps_on_disk(run) == [4, 8]
    # Lose everything after step 4, as a crash would, and run the same command again.
    shutil.rmtree(run / "checkpoints" / "8")
    result = cli(tmp_path, "train.steps=8", "checkpoint.every=4")
    assert result.returncode == 0, result.stderr
    assert "resumed from step 4" in result.stdout
    logged = losses(run)
    for step in (5, 6, 7, 8):  # same parameters, same batches: the same losses, bit for bit
        first, again = logged[step]
        assert first == again, (step, first, again)
    assert all(len(logged[s]) == 1 for s in (1, 2, 3, 4))


def test_retention_keeps_the_newest_and_every_mth(tmp_path):
    result = cli(tmp_path, "train.steps=10", "checkpoint.every=2", "checkpoint.keep=2",
                 "checkpoint.keep_every=4", "data.num_workers=0")
    assert result.returncode == 0, result.stderr
    assert steps_on_disk(tmp_path / "run") == [4, 8, 10]


def test_refusals_on_resume(tmp_path):
    assert cli(tmp_path, "train.steps=2", "data.num_workers=0").returncode == 0
    changed = cli(tmp_path, "train.steps=4", "data.num_workers=0", "model.num_layers=3")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "step 2: model.num_layers was 2 and is now 3; set it back or use a new train.run_dir" \
        in changed.stderr
    fresh = cli(tmp_path, "train.steps=4", "data.num_workers=0", "train.resume=false")
    assert fresh.returncode == 2 and "already holds checkpoints (latest step 2)" in fresh.stderr
    # A change that can resume (schedule length, logging, mesh) does.
    more = cli(tmp_path, "train.steps=4", "data.num_workers=0", "--emulate-devices", "4",
               "mesh.data=2", "mesh.fsdp=2")
    assert more.returncode == 0, more.stderr
    assert "resumed from step 2" in more.stdout and steps_on_disk(tmp_path / "run") == [2, 4]


def test_sigterm_saves_and_a_restart_continues(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    args = [sys.executable, "-m", "pjit_llm.train", *RUN, "train.steps=100000",
            "checkpoint.every=0", "train.run_dir=run", f"data.data_dir={tmp_path / 'data'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("loss") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "Traceback" not in err
    saved = steps_on_disk(tmp_path / "run")
    assert len(saved) == 1 and f"stopped by SIGTERM after step {saved[0]}" in out
    again = cli(tmp_path, f"train.steps={saved[0] + 2}", "checkpoint.every=0")
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {saved[0]}" in again.stdout
    assert max(losses(tmp_path / "run")) == saved[0] + 2


def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    args = [sys.executable, "-m", "pjit_llm.train", *RUN, "train.steps=100000",
            "checkpoint.every=1", "data.num_workers=0", "train.run_dir=run",
            f"data.data_dir={tmp_path / 'data'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "checkpoints").exists() and len(steps_on_disk(run)) >= 3):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, a save is almost certainly in flight
    proc.wait()
    latest = max(steps_on_disk(run))
    again = cli(tmp_path, f"train.steps={latest + 1}", "checkpoint.every=1", "data.num_workers=0")
    assert again.returncode == 0, again.stderr
    resumed = int(again.stdout.split("resumed from step ")[1].split()[0])
    assert resumed >= latest - 1  # the newest finished save (the newest may have been cut)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    assert cli(tmp_path, "train.steps=4", "checkpoint.every=2").returncode == 0
    run = tmp_path / "run"
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate the data files
    again = cli(tmp_path, "train.steps=6", "checkpoint.every=2")
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0]
    assert "resumed from step 2" in again.stdout
    assert any(p.name.startswith("4.unreadable-") for p in (run / "checkpoints").iterdir())
    assert steps_on_disk(run) == [2, 4, 6]  # step 4 written again from the good state


def flip_bytes_in_largest_data_file(step_dir, count=64):
    """Bit rot after a clean save: invert `count` bytes in the middle of the largest OCDBT
    data file (the `d/` folders) of a checkpoint's state, leaving its size unchanged."""
    data = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    largest = max(data, key=lambda f: f.stat().st_size)
    raw = bytearray(largest.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
    largest.write_bytes(bytes(raw))


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous(tmp_path):
    assert cli(tmp_path, "train.steps=6", "checkpoint.every=2").returncode == 0
    run = tmp_path / "run"
    uninterrupted = losses(run)
    flip_bytes_in_largest_data_file(run / "checkpoints" / "6")
    again = cli(tmp_path, "train.steps=6", "checkpoint.every=2")  # the same command, restarted
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and "checkpoint step 6" in warnings[0], again.stderr
    assert "differs from its checksum at save" in warnings[0]
    assert "resumed from step 4" in again.stdout
    assert any(p.name.startswith("6.damaged-") for p in (run / "checkpoints").iterdir())
    assert steps_on_disk(run) == [2, 4, 6]  # step 6 written again from the good state
    logged = losses(run)
    for step in (5, 6):  # retrained from step 4: the uninterrupted run's losses, bit for bit
        assert logged[step] == uninterrupted[step] * 2, (step, logged[step])


def test_checksums_are_mesh_independent_and_catch_one_changed_element():
    state = _setup((8, 1, 1))[0].init_state()
    # bfloat16 copies exercise the 16-bit path beside the float32 and int32 arrays.
    tree = {"state": state, "bf16": jax.tree.map(lambda p: p.astype(jax.numpy.bfloat16), state.params)}
    shardings = _setup((1, 2, 4))[0].shardings
    other = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), tree,
                         {"state": shardings, "bf16": shardings.params})
    wq = other["bf16"]["blocks"]["attn"]["wq"]
    assert wq[...].sharding != tree["bf16"]["blocks"]["attn"]["wq"][...].sharding
    saved = checksums.compute(tree)
    assert saved == checksums.compute(other) and checksums.first_mismatch(saved, other) is None
    # One element changed by one bit (the lowest of a bfloat16 element) is caught and named.
    value = wq[...]
    bits = jax.lax.bitcast_convert_type(value[1, 5, 3, 2], jax.numpy.uint16) ^ 1
    wq.set_value(value.at[1, 5, 3, 2].set(jax.lax.bitcast_convert_type(bits, jax.numpy.bfloat16)))
    changed = checksums.compute(other)["arrays"]
    assert [k for k in changed if changed[k] != saved["arrays"][k]] == ["bf16/blocks/attn/wq/value"]
    assert checksums.first_mismatch(saved, other) == \
        "bf16/blocks/attn/wq/value differs from its checksum at save"


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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = cli(tmp_path, "train.steps=20", "checkpoint.every=1", "optimizer.lr=1e30",
                 "optimizer.clip_norm=0", "data.num_workers=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "the training loss was not finite at step" in line and "the last good checkpoint" in line
    bad = int(line.split("not finite at step ")[1].split(";")[0])
    assert max(steps_on_disk(tmp_path / "run")) < bad


def test_export_writes_parameters_only_and_restores_without_the_optimizer(tmp_path):
    assert cli(tmp_path, "train.steps=3", "data.num_workers=0").returncode == 0
    result = subprocess.run([sys.executable, "-m", "pjit_llm.export", "--run", "run",
                             "--dtype", "bfloat16"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run" / "export" / "step_3-bfloat16"
    assert f"wrote parameters of step 3 in bfloat16 to {out}" in result.stdout
    layout = Layout(make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), tiny_config().mesh.rules)
    model, params = load_params(out, layout)
    assert model.num_layers == 2 and model.param_dtype == "bfloat16"
    wq = params["blocks"]["attn"]["wq"]
    wq = wq[...] if isinstance(wq, nnx.Variable) else wq
    assert wq.dtype == jax.numpy.bfloat16 and wq.sharding.spec[1] == "fsdp"
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    ckpt = sum(f.stat().st_size for f in (tmp_path / "run/checkpoints/3/state").rglob("*") if f.is_file())
    assert size < ckpt / 4  # no optimizer state, half the bytes per parameter
    again = subprocess.run([sys.executable, "-m", "pjit_llm.export", "--run", "run"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def _batch():
    rng = np.random.default_rng(0)
    return {"tokens": ((rng.integers(0, 256, (16, 1)) + np.arange(32)) % 256).astype(np.int32),
            "segment_ids": np.ones((16, 32), np.int32),
            "positions": np.tile(np.arange(32, dtype=np.int32), (16, 1))}


def _setup(shape, devices=None, *overrides):
    parts = build(dataclasses.replace(tiny_config(*overrides), mesh=MeshConfig(*shape)),
                  devices=devices)
    put = lambda b: jax.device_put(b, parts.batch_sharding)  # noqa: E731
    return parts, put


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
    parts, put = _setup((2, 2, 2))
    cfg = parts.cfg
    state, _ = parts.train_step(parts.init_state(), put(_batch()))
    position = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(position)
    ckpts = Checkpoints(tmp_path, CheckpointConfig())
    ckpts.save(1, state, position.get_state(), cfg)
    ckpts.wait()
    saved = jax.tree.map(np.asarray, state)
    _, metrics = parts.train_step(state, put(_batch()))  # donates `state`
    next_loss = float(metrics["loss"])
    for shape, devices in (((1, 4, 1), jax.devices()[:4]), ((1, 1, 1), jax.devices()[:1])):
        parts, put = _setup(shape, devices)
        target_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
        restored, step = Checkpoints(tmp_path, CheckpointConfig()).restore(
            parts.abstract_state, target_iter, parts.cfg)

        assert step == 1 and next(target_iter) == 1  # the data position came back too
        for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                           jax.tree.leaves(parts.shardings)):
            assert a.sharding == s  # restored straight into the target layout
            np.testing.assert_array_equal(np.asarray(a), b)
        _, metrics = parts.train_step(restored, put(_batch()))
        np.testing.assert_allclose(float(metrics["loss"]), next_loss, rtol=2e-5)
    # A checkpoint saved before checksums existed restores unchecked.
    shutil.rmtree(tmp_path / "1" / checksums.ITEM)
    restored, step = Checkpoints(tmp_path, CheckpointConfig()).restore(
        parts.abstract_state, target_iter, parts.cfg)
    assert step == 1


def test_skipping_a_non_finite_step_leaves_the_state_unchanged():
    parts, put = _setup((2, 2, 2), None, "train.max_bad_steps=1")  # skips non-finite steps
    state = parts.init_state()
    scale = state.params["final_norm"]["scale"]
    scale.set_value(jax.device_put(scale[...].at[0].set(np.inf), scale[...].sharding))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    batch = put({"tokens": np.zeros((16, 32), np.int32), "segment_ids": np.ones((16, 32), np.int32),
                 "positions": np.tile(np.arange(32, dtype=np.int32), (16, 1))})
    after, metrics = parts.train_step(state, batch)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 (after.params, after.opt_state), before)
