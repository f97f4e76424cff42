"""Datasets as TFDS sources: local corpora prepared once and split, the built-in corpus in
TFDS's default directory, catalogue datasets prepared on first use, errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pjit_llm.config import DataConfig
from pjit_llm.data.pipeline import packed_batches
from pjit_llm.data.sources import prepare
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.errors import UserError

TOK = ByteTokenizer()


def collect(ds) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in ds]


def test_local_corpus_is_prepared_once_and_split(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(200)))
    cfg = DataConfig(source="local", paths=(str(corpus),), data_dir=str(tmp_path / "data"),
                     val_fraction=0.1)
    ds = prepare(cfg)
    assert (len(ds.train), len(ds.val)) == (180, 20)
    texts = {r["text"] for r in ds.train} | {r["text"] for r in ds.val}
    assert len(texts) == 200
    stamp = (ds.directory / "dataset_info.json").stat().st_mtime_ns
    again = prepare(cfg)  # reused, not rewritten
    assert again.directory == ds.directory
    assert (ds.directory / "dataset_info.json").stat().st_mtime_ns == stamp
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert prepare(cfg).directory != ds.directory  # changed files, new dataset


def test_empty_corpus_is_refused_and_leaves_nothing(tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("not json\n{\"other\": 1}\n")
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as e:
        prepare(DataConfig(source="local", paths=(str(corpus),), data_dir=str(data_dir)))
    assert str(e.value) == (f"the corpus gives no train records (1 files; skipped 2 bad records "
                            f"in {corpus}: line 1 is not JSON (Expecting value at column 1); "
                            "line 2: field 'text' is missing); add text")
    leftovers = [p for p in data_dir.rglob("*") if p.is_file()] if data_dir.exists() else []
    assert leftovers == []


def test_preparing_warns_of_binary_files_and_replaced_bytes_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "".join(f"line {i} of the corpus\n" for i in range(1000))
    Path("a.txt").write_bytes(text.encode().replace(b"line 500 ", b"line 500 \xe9 "))
    Path("logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(200))
    ds = prepare(DataConfig(source="local", paths=("a.txt", "logo.png"),
                            data_dir=str(tmp_path / "data"), val_fraction=0.5))
    assert (len(ds.train), len(ds.val)) == (1, 1)  # the text file's two records, nothing else
    first, second = sorted((ds.train[0]["text"].decode(), ds.val[0]["text"].decode()),
                           key=lambda t: not t.startswith("line 0 "))
    assert first + second == text.replace("line 500 ", "line 500 \ufffd ")
    assert ("warning: skipped 1 file that is binary, not text: logo.png (a NUL byte at offset 8); "
            "replaced 1 byte that is not UTF-8 with U+FFFD in a.txt (at line 501)\n"
            in capsys.readouterr().err)


def test_builtin_corpus_goes_through_the_same_path():
    """Without a data.data_dir it is prepared in TFDS's default directory (TFDS_DATA_DIR,
    which conftest.py points at a temporary one; ~/tensorflow_datasets otherwise)."""
    ds = prepare(DataConfig())
    assert len(ds.train) > 10 * len(ds.val) > 0
    assert ds.directory.parent.parent.name == "text_corpus"
    assert Path(os.environ["TFDS_DATA_DIR"]) in ds.directory.parents


class TinyLines(tfds.core.GeneratorBasedBuilder):
    """A real catalogue-style dataset, prepared offline by TFDS itself in the tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"sentence": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40), "test": self._generate_examples(10)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"sentence": f"sentence number {i} of {n}", "label": i}


def test_tfds_catalogue_dataset_prepared_on_first_use(tmp_path):
    cfg = DataConfig(source="tfds", name="tiny_lines", text_field="sentence",
                     data_dir=str(tmp_path), val_split="test")
    ds = prepare(cfg)
    assert (len(ds.train), len(ds.val)) == (40, 10) and ds.text_field == "sentence"
    carved = prepare(DataConfig(source="tfds", name="tiny_lines", text_field="sentence",
                                data_dir=str(tmp_path), val_fraction=0.1))
    assert (len(carved.train), len(carved.val)) == (36, 4)
    texts = {r["sentence"] for r in carved.train} | {r["sentence"] for r in carved.val}
    assert len(texts) == 40
    batches = collect(packed_batches(carved.train, TOK, "sentence", DataConfig(seq_len=32), 2,
                                     0, 1, train=False))
    assert batches and batches[0]["tokens"].shape == (2, 32)
    with pytest.raises(UserError, match="has no feature 'text'; set data.text_field to one of label, sentence"):
        prepare(DataConfig(source="tfds", name="tiny_lines", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="has no split 'dev'; it has test, train"):
        prepare(DataConfig(source="tfds", name="tiny_lines", text_field="sentence",
                           data_dir=str(tmp_path), val_split="dev"))


def test_tfds_catalogue_mocked_offline(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        ds = prepare(DataConfig(source="tfds", name="lm1b", data_dir=str(tmp_path),
                                val_split="test"))
        assert len(ds.train) == 12
        batches = collect(packed_batches(ds.train, TOK, "text", DataConfig(seq_len=16), 2, 0, 1,
                                         train=False))
        assert batches and (batches[0]["segment_ids"] > 0).any()


def test_tfds_errors(tmp_path):
    with pytest.raises(UserError, match="is not in the TFDS catalogue"):
        prepare(DataConfig(source="tfds", name="no_such_dataset_xyz", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="is not prepared in .*set data.download=true"):
        prepare(DataConfig(source="tfds", name="lm1b", data_dir=str(tmp_path), download=False))

