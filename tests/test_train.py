"""The real CLI in fresh processes: errors exit 2 with one line, a short run writes its run dir."""

import json
import math

import pytest
import yaml

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def assert_refused(result, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("args, message", [
    (["model.num_layer=3"], "unknown config key model.num_layer; did you mean model.num_layers?"),
    (["model.num_layers=four"], "model.num_layers must be an integer, got 'four'"),
    (["model.num_heads=5"], "model.num_heads=5 does not divide model.embed_dim=256"),
    (["--emulate-devices", "8", "mesh.data=3"], "mesh (data=3, fsdp=1, tensor=1) needs 3 devices but 8"),
    (["--emulate-devices", "8", "mesh.data=1", "mesh.tensor=8"],
     "(kv_heads=4) is not divisible by mesh axes tensor=8"),
    (["--emulate-devices", "8", "data.batch_size=12"], "is not divisible by the 8 batch shards"),
    (["--config", "does/not/exist.yaml"], "config file does/not/exist.yaml does not exist"),
    (["optimizer.warmup_steps=500"], "optimizer.warmup_steps=500 must be smaller than train.steps=300"),
    (["model.attention=cudnn", "model.dtype=bfloat16"],
     "model.attention=cudnn cannot be used: it needs a GPU and the backend is cpu"),
    (["model.loss_chunk=48"], "model.loss_chunk=48 must divide data.seq_len=128"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, args, message):
    result = run_cli(*args, f"train.run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'data'}",
                     cwd=tmp_path)
    assert_refused(result, message)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("files, args, message", [
    ({}, ["data.source=local", "data.paths=[missing/*.txt]"], "data.paths: nothing found at 'missing/*.txt'"),
    ({"c.jsonl": "not json\n"}, ["data.source=local", "data.paths=[c.jsonl]"],
     "the corpus gives no train records (1 files; skipped 1 not JSON)"),
    ({"c.txt": "some text\n" * 4000, "bad.model": "junk"},
     ["data.source=local", "data.paths=[c.txt]", "data.tokenizer=sentencepiece",
      "data.tokenizer_path=bad.model"], "bad.model is not a SentencePiece model"),
    ({"c.txt": "some text\n" * 4000}, ["data.source=local", "data.paths=[c.txt]", "data.tokenizer=hf"],
     "data.tokenizer=hf needs data.tokenizer_path"),
    ({}, ["data.source=tfds"], "data.source=tfds needs data.name"),
    ({}, ["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_len=2048"),
])
def test_data_errors_exit_2_with_one_line(tmp_path, files, args, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = run_cli(*args, "train.run_dir=run", "data.data_dir=data", cwd=tmp_path)
    assert_refused(result, message)
    assert not (tmp_path / "run").exists()
    # Nothing half-written: no dataset left in TFDS's temporary preparation directories.
    assert not [p for p in tmp_path.rglob("*") if "incomplete" in p.name]


def test_local_jsonl_run_skips_bad_records_with_a_count(tmp_path):
    lines = [json.dumps({"text": f"record {i}: " + "the quick brown fox " * 8}) for i in range(60)]
    lines[5] = "{broken"
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(*TINY, "train.steps=4", "train.log_every=2", "data.source=local",
                     "data.paths=[c.jsonl]", "data.num_workers=2", "train.run_dir=run",
                     "data.data_dir=data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: skipped 1 bad records (1 not JSON)" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_short_run_on_a_hybrid_mesh_writes_its_run_directory(tmp_path):
    run = tmp_path / "run"
    result = run_cli("--emulate-devices", "8", *TINY, "mesh.data=2", "mesh.fsdp=2",
                     "mesh.tensor=2", "train.steps=6", "train.log_every=2", "train.eval_every=3",
                     "train.eval_batches=2", f"train.run_dir={run}", f"data.data_dir={tmp_path}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mesh data=2 x fsdp=2 x tensor=2 over 8 cpu device(s)" in result.stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["mesh"]["data"] == 2 and config["model"]["vocab_size"] == 384
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in train)
    assert evals[0]["eval_loss"] > 0.8 * math.log(384)  # a fresh model knows next to nothing
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
