"""Global batches: a seeded training order that resumes exactly (worker processes on), fixed
padded evaluation batches, each process feeding the rows its devices hold."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pjit_llm.config import DataConfig, MeshConfig
from pjit_llm.data.loader import Loader, eval_batches, local_rows
from pjit_llm.data.sources import Dataset
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.errors import UserError
from pjit_llm.parallel.mesh import make_mesh

TOK = ByteTokenizer()


def docs_source(n=60, seed=0):
    """Documents of varied length whose bytes say which document they are."""
    rng = np.random.default_rng(seed)
    return [{"text": f"<{i}>" + "abcdefgh"[i % 8] * int(rng.integers(1, 90))} for i in range(n)]


def _loader(cfg, **mesh_sizes):
    mesh = make_mesh(MeshConfig(**(mesh_sizes or {"data": 2, "fsdp": 2, "tensor": 2})))
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
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert local_rows(NamedSharding(mesh, P(("data", "fsdp"), None)), 8, 16) == 8
    assert jax.process_count() == 1

