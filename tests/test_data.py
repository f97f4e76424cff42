"""Sources, records, the Grain pipeline (packing, per-process shares, exact resume)."""

import collections
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from pjit_llm.config import DataConfig, MeshConfig
from pjit_llm.data import builtin
from pjit_llm.data.loader import Loader, eval_batches, local_rows
from pjit_llm.data.pipeline import packed_batches
from pjit_llm.data.records import RECORD_BYTES, expand_paths, is_validation, read_records
from pjit_llm.data.sources import Dataset, prepare
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.errors import UserError
from pjit_llm.parallel.mesh import make_mesh

TOK = ByteTokenizer()


def docs_source(n=60, seed=0):
    """Documents of varied length whose bytes say which document they are."""
    rng = np.random.default_rng(seed)
    return [{"text": f"<{i}>" + "abcdefgh"[i % 8] * int(rng.integers(1, 90))} for i in range(n)]


def collect(ds) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in ds]


def segments(batches) -> list[np.ndarray]:
    """Every (row, segment) piece of tokens, in order."""
    out = []
    for b in batches:
        for tok, seg in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, seg.max() + 1):
                out.append(tok[seg == s])
    return out


# ---------------------------------------------------------------- records and sources


def test_text_files_are_cut_at_line_ends_and_bad_records_counted(tmp_path):
    big = "".join(f"line {i} ü\n" for i in range(4000))  # several records' worth
    (tmp_path / "a.txt").write_text(big)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe not utf-8\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "one"}\nnot json\n{"body": "no field"}\n{"text": 3}\n'
                      b'\n{"text": "\xff"}\n{"text": "two"}\n')
    skipped = collections.Counter()
    records = list(read_records(expand_paths((str(tmp_path),)), "text", skipped))
    texts = dict(records)
    a = [t for k, t in records if "a.txt" in k]
    assert "".join(a) == big and all(len(t.encode()) <= RECORD_BYTES and t.endswith("\n") for t in a)
    assert len(a) > 2
    assert [t for k, t in records if "b.jsonl" in k] == ["one", "two"]
    assert skipped == {"not UTF-8": 2, "not JSON": 1, "no text field 'text'": 2}
    assert len(texts) == len(records)  # keys are unique


def test_validation_share_is_spread_and_never_empty():
    assert [i for i in range(60) if is_validation(i, 0.05)] == [0, 20, 40]
    assert [i for i in range(10) if is_validation(i, 0.25)] == [0, 4, 8]
    assert sum(is_validation(i, 0.3) for i in range(1000)) == 300
    assert is_validation(0, 0.01) and not is_validation(1, 0.5)


def test_paths_globs_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/x.txt", "d/sub/y.txt", "d/.hidden", "z.md"):
        (tmp_path / name).write_text("hi")
    keys = [k for k, _ in expand_paths((str(tmp_path / "d"), str(tmp_path / "*.md")))]
    assert [k.removeprefix(str(tmp_path) + "/") for k in keys] == ["d/sub/y.txt", "d/x.txt", "z.md"]
    with pytest.raises(UserError, match="nothing found at"):
        expand_paths((str(tmp_path / "missing.txt"),))
    with pytest.raises(UserError, match="nothing found at"):
        expand_paths((str(tmp_path / "*.json"),))


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
    with pytest.raises(UserError, match=r"the corpus gives no train records .*skipped 1 not JSON"):
        prepare(DataConfig(source="local", paths=(str(corpus),), data_dir=str(data_dir)))
    leftovers = [p for p in data_dir.rglob("*") if p.is_file()] if data_dir.exists() else []
    assert leftovers == []


def test_builtin_corpus_goes_through_the_same_path(tmp_path):
    names = [n for n, _ in builtin.files()]
    assert any(n.endswith("pydoc_data/topics.py") for n in names)
    assert not any("/test/" in f"/{n}" for n in names)
    ds = prepare(DataConfig(data_dir=str(tmp_path)))
    assert len(ds.train) > 10 * len(ds.val) > 0
    assert ds.directory.parent.parent.name == "text_corpus"


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


# ---------------------------------------------------------------- the Grain pipeline


@pytest.mark.parametrize("workers", [0, 2])
def test_concat_packing_loses_and_duplicates_nothing(workers):
    source = docs_source()
    cfg = DataConfig(seq_len=16, num_workers=workers)
    batches = collect(packed_batches(source, TOK, "text", cfg, 4, 0, 1, train=False))
    stream = np.concatenate([np.append(TOK.encode(r["text"]), np.int32(TOK.eos_id)) for r in source])
    if workers:  # each worker packs its own share of the records
        stream = np.concatenate([np.append(TOK.encode(source[i]["text"]), np.int32(TOK.eos_id))
                                 for w in range(workers) for i in range(w, len(source), workers)])
    got = []
    for b in batches:
        assert b["tokens"].shape[1] == 16 and b["tokens"].dtype == np.int32
        for tok, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
            got.append(tok[seg > 0])
            for s in range(1, seg.max() + 1):  # positions count 0, 1, ... inside each piece
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
            assert (np.diff(seg[seg > 0]) >= 0).all() and seg[0] == 1
    assert sorted(np.concatenate(got).tolist()) == sorted(stream.tolist())
    if not workers:
        np.testing.assert_array_equal(np.concatenate(got), stream)


def test_first_fit_packing_keeps_documents_whole_or_truncated():
    source = docs_source()
    cfg = DataConfig(seq_len=48, packing="first_fit")
    pieces = segments(collect(packed_batches(source, TOK, "text", cfg, 4, 0, 1, train=False)))
    expected = [np.append(TOK.encode(r["text"]), np.int32(TOK.eos_id))[:48] for r in source]
    assert sorted(p.tobytes() for p in pieces) == sorted(e.tobytes() for e in expected)


def test_processes_read_disjoint_shares_that_cover_the_data():
    source = docs_source(61)
    cfg = DataConfig(seq_len=64, packing="first_fit")
    seen = []
    for pid in range(2):
        pieces = segments(collect(packed_batches(source, TOK, "text", cfg, 2, pid, 2, train=False)))
        seen.append({TOK.decode(p).split(">")[0] for p in pieces})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"<{i}" for i in range(61)}


def _loader(cfg, mesh_shape=(2, 2, 2)):
    mesh = make_mesh(MeshConfig(*mesh_shape))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    dataset = Dataset(docs_source(200), docs_source(10, seed=1), None, "text")
    return Loader(dataset, TOK, cfg, sharding), dataset, sharding


def test_training_order_is_seeded_and_resumes_exactly_with_workers():
    cfg = DataConfig(seq_len=32, batch_size=8, num_workers=2, seed=3)
    loader, _, sharding = _loader(cfg)
    try:
        first = next(loader)
        assert first["tokens"].shape == (8, 32) and first["tokens"].sharding == sharding
        for _ in range(3):
            next(loader)
        state = loader.get_state()
        expected = [np.asarray(next(loader)["tokens"]) for _ in range(4)]
    finally:
        loader.close()
    resumed, _, _ = _loader(cfg)
    try:
        resumed.set_state(state)
        got = [np.asarray(next(resumed)["tokens"]) for _ in range(4)]
    finally:
        resumed.close()
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    other, _, _ = _loader(DataConfig(seq_len=32, batch_size=8, num_workers=0, seed=4))
    try:
        assert not np.array_equal(np.asarray(next(other)["tokens"]), np.asarray(first["tokens"]))
    finally:
        other.close()


def test_evaluation_batches_are_fixed_and_padded():
    cfg = DataConfig(seq_len=32, batch_size=8)
    _, dataset, sharding = _loader(cfg)
    batches = eval_batches(dataset, TOK, cfg, sharding, num_batches=5)
    assert len(batches) == 5
    tokens = [int((np.asarray(b["segment_ids"]) > 0).sum()) for b in batches]
    assert tokens[0] > 0 and tokens[-1] == 0  # 10 short documents do not fill 5 batches
    again = eval_batches(dataset, TOK, cfg, sharding, num_batches=5)
    np.testing.assert_array_equal(np.asarray(again[0]["tokens"]), np.asarray(batches[0]["tokens"]))
    empty = Dataset(docs_source(), [], None, "text")
    with pytest.raises(UserError, match="validation split has no tokens"):
        eval_batches(empty, TOK, cfg, sharding, num_batches=1)


def test_each_process_feeds_the_rows_its_devices_hold():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    assert local_rows(NamedSharding(mesh, P(("data", "fsdp"), None)), 8, 16) == 8
    assert jax.process_count() == 1
