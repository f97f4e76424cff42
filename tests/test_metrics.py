"""The metrics log: JSONL records, a progress bar on a terminal and plain lines otherwise;
a mixture's tokens per source; Weights & Biases offline, read back from its file on disk."""

import importlib.util
import io
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, run_module

from pjit_llm.errors import UserError
from pjit_llm.metrics import (WANDB_ID_FILE, MetricsLog, WandbRun, format_record, human_bytes,
                              human_count)


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    record = {"step": 5, "loss": 2.5, "tokens_per_s": 1000.0}
    plain = MetricsLog(tmp_path, total_steps=10)
    plain.write(record)
    plain.close()
    assert "step 5 | loss 2.5" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdout", Terminal())
    bar = MetricsLog(tmp_path, append=True, total_steps=10)
    bar.write(record)
    assert bar._bar.n == 5 and "loss=2.5" in str(bar._bar)
    bar.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 5]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_the_tensorboard_writer_imports_no_torch(tmp_path):
    """tensorboardX imports torch when it is installed (the hf extra): 1.5 s of CPU in every
    training process, for nothing the metrics log uses."""
    code = ("import sys; from pathlib import Path; from pjit_llm.metrics import MetricsLog; "
            "log = MetricsLog(Path(sys.argv[1])); log.write({'step': 1, 'loss': 2.0}); "
            "log.close(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = run_module(None, str(tmp_path), code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_numbers_are_printed_short():
    assert format_record({"step": 3, "loss": 2.345678, "tokens_per_s": 123456.7}) == \
        "step 3 | loss 2.346 | tokens_per_s 123,457"
    assert human_count(1_234_567) == "1.23M" and human_bytes(3 * 2**30) == "3 GiB"


def read_wandb_file(path: Path) -> list:
    """The records of a W&B run file: wandb 0.31 has no Python reader, so this follows its
    framing (a 7-byte file header, then LevelDB-log records in 32 KiB blocks, each a
    checksum, a length and a type, long records in pieces) and decodes the records with
    wandb's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, piece, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            records.append(record)
            piece = b""
    return records


def wandb_history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]


def test_a_mixture_run_logs_tokens_per_source_to_tensorboard_and_wandb_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pjit_llm.train import main as train
    (tmp_path / "prose.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 3000)
    (tmp_path / "code.txt").write_text("def f(x):\n    return x + 1\n" * 4000)
    run = tmp_path / "run"
    mixture = (f"data.mixture=[{{source: local, paths: [{tmp_path / 'prose.txt'}], weight: 3}}, "
               f"{{source: local, paths: [{tmp_path / 'code.txt'}], weight: 1}}]")
    train([*TINY, mixture, f"data.data_dir={tmp_path / 'data'}", "data.num_workers=0",
           "train.steps=4", "train.log_every=2", "train.eval_batches=1", "train.sample_tokens=0",
           "train.wandb_project=tests", "train.wandb_mode=offline", f"train.run_dir={run}"])

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:  # concat packing fills every row: 16 x 32 tokens a step, 3 : 1
        assert r["tokens_prose"] + r["tokens_code"] == r["step"] * 16 * 32
        assert r["tokens_prose"] == 3 * r["tokens_code"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/tokens_code")] == \
        [r["tokens_code"] for r in logged]

    run_id = (run / WANDB_ID_FILE).read_text().strip()
    [file] = (run / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    history = wandb_history(read_wandb_file(file))
    train_rows = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train_rows] == [2, 4]
    for h, r in zip(train_rows, logged):
        assert h["train/loss"] == pytest.approx(r["loss"])
        assert (h["train/tokens_prose"], h["train/tokens_code"]) == \
            (r["tokens_prose"], r["tokens_code"])
    assert [h["_step"] for h in history if "eval/eval_loss" in h] == [0, 4]
    run_record = next(r for r in read_wandb_file(file) if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run_record.run.config.update}
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == resolved["model"] and config["data"] == resolved["data"]
    assert config["data"]["mixture"][1]["weight"] == 1.0
    assert run_record.run.run_id == run_id and run_record.run.project == "tests"


def test_a_resumed_run_continues_its_wandb_run_with_samples(tmp_path):
    def log(resume: bool, step: int) -> str:
        wandb = WandbRun(tmp_path, "tests", "offline", {"train": {"steps": 9}}, resume=resume)
        metrics = MetricsLog(tmp_path, append=resume, wandb=wandb)
        metrics.write({"step": step, "loss": 1.0 / step})
        metrics.text("samples/0", f"def at {step}", step)
        metrics.close()
        return wandb.id

    first = log(False, 1)
    assert log(True, 2) == first == (tmp_path / WANDB_ID_FILE).read_text().strip()
    files = sorted((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert [f.name for f in files] == [f"run-{first}.wandb"] * 2
    rows = [h for f in files for h in wandb_history(read_wandb_file(f))]
    assert [(h["_step"], h["train/loss"], h["samples/0"]) for h in rows] == \
        [(1, 1.0, "def at 1"), (2, 0.5, "def at 2")]
    assert log(False, 1) != first  # a fresh run in the directory is a new W&B run


def test_wandb_without_the_package_names_the_extra(tmp_path, monkeypatch):
    from pjit_llm.train import main as train
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets uninstalled
    with pytest.raises(UserError) as e:
        train([*TINY, "train.wandb_project=p", f"train.run_dir={tmp_path / 'run'}"])
    assert str(e.value).startswith("train.wandb_project needs the wandb package: pip install "
                                   "'pjit_llm[wandb]'")
    assert not (tmp_path / "run").exists()
