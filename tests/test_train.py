"""The training command in this process: every config and data error is refused with one line
and nothing written. (One of each kind through a real process: e2e/test_train_cli.py.)"""

import pytest

from pjit_llm.errors import UserError
from pjit_llm.train import main

# This process already has the 8 devices that --emulate-devices 8 asks for.
CONFIG_ERRORS = [
    (["model.num_layer=3"], "unknown config key model.num_layer; did you mean model.num_layers?"),
    (["model.num_layers=four"], "model.num_layers must be an integer, got 'four'"),
    (["model.num_heads=5"], "model.num_heads=5 does not divide model.embed_dim=256"),
    (["--emulate-devices", "8", "mesh.data=3"],
     "mesh (data=3, stage=1, fsdp=1, context=1, tensor=1, expert=1) needs 3 devices but 8"),
    (["--emulate-devices", "8", "mesh.data=1", "mesh.tensor=8", "model.num_heads=4"],
     "model.num_heads=4 query heads (model.num_kv_heads=4) do not split over mesh axes tensor=8"),
    (["--emulate-devices", "8", "data.batch_size=12"], "is not divisible by the 8 batch shards"),
    (["--config", "does/not/exist.yaml"], "config file does/not/exist.yaml does not exist"),
    (["optimizer.warmup_steps=500"], "optimizer.warmup_steps=500 must be smaller than train.steps=300"),
    (["train.steps=1"], "optimizer.warmup_steps=20 must be smaller than train.steps=1"),
    (["--emulate-devices", "0"], "--emulate-devices 0 is not a number of devices; give 1 or more"),
    (["model.attention=cudnn", "model.dtype=bfloat16"],
     "model.attention=cudnn cannot be used: it needs a GPU and the backend is cpu"),
    (["model.loss_chunk=48"], "model.loss_chunk=48 must divide data.seq_len=128"),
    (["--emulate-devices", "8", "mesh.stage=4"],
     "model.num_layers=2 is not divisible by mesh.stage=4 x train.pipeline_repeats=1"),
    (["train.pipeline_repeats=0"], "train.pipeline_repeats=0 must be positive"),
    (["model.quantize=int8"], ("model.quantize=int8 describes quantized parameters, which only "
                               "evaluate and generate read; train with model.quantize=none")),
    (["model.quantize=int4"], "model.quantize='int4' is not one of: none, int8"),
]


def assert_refused(args, message):
    with pytest.raises(UserError) as e:
        main(args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("args, message", CONFIG_ERRORS)
def test_config_errors_are_refused_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert_refused([*args, "train.run_dir=run", "data.data_dir=data"], message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing written


@pytest.mark.parametrize("files, args, message", [
    ({}, ["data.source=local", "data.paths=[missing/*.txt]"], "data.paths: nothing found at 'missing/*.txt'"),
    ({"c.jsonl": "not json\n"}, ["data.source=local", "data.paths=[c.jsonl]"],
     "the corpus gives no train records (1 files; skipped 1 bad record in c.jsonl: line 1 is not "
     "JSON (Expecting value at column 1))"),
    ({"c.txt": "some text\n" * 4000, "bad.model": "junk"},
     ["data.source=local", "data.paths=[c.txt]", "data.tokenizer=sentencepiece",
      "data.tokenizer_path=bad.model"], "bad.model is not a SentencePiece model"),
    ({"c.txt": "some text\n" * 4000}, ["data.source=local", "data.paths=[c.txt]", "data.tokenizer=hf"],
     "data.tokenizer=hf needs data.tokenizer_path"),
    ({}, ["data.source=tfds"], "data.source=tfds needs data.name"),
    ({"a.txt": "some text\n" * 4000}, ["data.mixture=[{source: local, paths: [a.txt]}, "
                                      "{source: local, paths: [missing/*.txt], label: b}]"],
     "data.mixture[1].paths: nothing found at 'missing/*.txt'"),
    ({"a.txt": "some text\n" * 4000, "b.jsonl": "not json\n"},
     ["data.mixture=[{source: local, paths: [a.txt]}, {source: local, paths: [b.jsonl]}]"],
     "data.mixture[1] (b): the corpus gives no train records (1 files; skipped 1 bad record in "
     "b.jsonl: line 1 is not JSON (Expecting value at column 1))"),
    ({}, ["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_len=2048"),
])
def test_data_errors_are_refused_with_one_line(tmp_path, monkeypatch, files, args, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert_refused([*args, "train.run_dir=run", "data.data_dir=data"], message)
    assert not (tmp_path / "run").exists()
    # Nothing half-written: no dataset left in TFDS's temporary preparation directories.
    assert not [p for p in tmp_path.rglob("*") if "incomplete" in p.name]
