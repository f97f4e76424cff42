"""Tokenizer, built-in corpus, packing and the step-addressed global batches."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pjit_llm.config import DataConfig
from pjit_llm.data import builtin
from pjit_llm.data.loader import Batches, load_splits
from pjit_llm.data.packing import pack
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.mesh import make_mesh
from pjit_llm.config import MeshConfig


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld — ok"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(list(ids) + [tok.eos_id]) == text


def test_pack_lays_documents_end_to_end():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 29)]  # lengths 5, 3, 9
    rows = pack(docs, seq_len=4)
    assert rows["tokens"].shape == (5, 4)
    np.testing.assert_array_equal(rows["tokens"].ravel()[:17], np.concatenate(docs))
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1],
                                                        [1, 1, 1, 1], [1, 0, 0, 0]])
    # Positions restart at each document and at each row (a document cut by a row boundary
    # continues as a new piece).
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3],
                                                      [0, 1, 2, 3], [0, 0, 0, 0]])


def test_builtin_corpus_and_split():
    docs = builtin.documents()
    names = [n for n, _ in docs]
    assert len(docs) > 100 and len(set(names)) == len(names)
    assert any(n.endswith("pydoc_data/topics.py") for n in names)
    assert not any("/test/" in f"/{n}" for n in names)
    val = [n for n in names if builtin.is_validation(n, 0.05)]
    assert 0.02 < len(val) / len(names) < 0.1
    assert val == [n for n in names if builtin.is_validation(n, 0.05)]  # stable


def test_load_splits_packs_both_splits():
    tok = ByteTokenizer()
    train, val = load_splits(DataConfig(seq_len=64), tok)
    for rows in (train, val):
        assert rows["tokens"].shape[1] == 64 and rows["tokens"].max() <= tok.eos_id
        assert (rows["segment_ids"][:, 0] == 1).all()
    assert len(train["tokens"]) > 4 * len(val["tokens"])


def _rows(n=40, L=8):
    return {"tokens": np.arange(n * L, dtype=np.int32).reshape(n, L),
            "segment_ids": np.ones((n, L), np.int32), "positions": np.zeros((n, L), np.int32)}


def test_batches_are_a_function_of_the_step():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    a, b = Batches(_rows(), 8, sharding, seed=3), Batches(_rows(), 8, sharding, seed=3)
    seen = [np.asarray(a(step)["tokens"])[:, 0] // 8 for step in range(5)]  # one epoch of 40 rows
    assert sorted(np.concatenate(seen)) == list(range(40))  # every row exactly once per epoch
    # A fresh loader asked for step 3 (as after a resume) gives the same batch.
    np.testing.assert_array_equal(np.asarray(b(3)["tokens"]), np.asarray(a(3)["tokens"]))
    assert a(0)["tokens"].sharding == sharding
    epoch2 = np.asarray(a(5)["tokens"])[:, 0] // 8
    assert not np.array_equal(epoch2, seen[0])  # a new order each epoch


def test_evaluation_batches_are_in_order():
    sharding = NamedSharding(make_mesh(MeshConfig()), P(("data", "fsdp"), None))
    rows = Batches(_rows(), 8, sharding, seed=None)
    np.testing.assert_array_equal(np.asarray(rows(1)["tokens"])[:, 0] // 8, np.arange(8, 16))


def test_each_process_builds_only_its_rows():
    # One process here holds every device, so it builds the whole batch; the range comes
    # from the sharding's addressable devices, which is what splits the work across hosts.
    sharding = NamedSharding(make_mesh(MeshConfig()), P(("data", "fsdp"), None))
    batches = Batches(_rows(), 8, sharding, seed=0)
    assert (batches.start, batches.stop) == (0, 8)
    assert jax.process_count() == 1
