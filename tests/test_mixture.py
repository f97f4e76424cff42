"""Weighted mixtures: rows drawn from each source by weight and tagged with it, token counts
per source, an exact resume with worker processes on, sources prepared from the config."""

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pjit_llm.config import DataConfig, MeshConfig, MixtureSource
from pjit_llm.data import mixture
from pjit_llm.data.datasets import prepare
from pjit_llm.data.loader import Loader
from pjit_llm.data.sources import Dataset
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.errors import UserError
from pjit_llm.parallel.mesh import make_mesh

TOK = ByteTokenizer()
LETTERS = "abc"  # source k writes only LETTERS[k] (and digits, brackets, the end of text)


def docs(letter: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": f"<{i}>" + letter * int(rng.integers(1, 70))} for i in range(n)]


def three_sources(weights=(3, 2, 1)) -> mixture.Mixture:
    parts = [mixture.Part(letter, w, Dataset(docs(letter, 80, k), docs(letter, 6, 10 + k), None,
                                             "text"), (letter,))
             for k, (letter, w) in enumerate(zip(LETTERS, weights))]
    return mixture.Mixture(parts, train=None, val=None, directory=None)


def _loader(cfg, mix):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    return Loader(mix, TOK, cfg, NamedSharding(mesh, P(("data", "fsdp"), None)))


def source_of_rows(tokens_RL, segment_ids_RL) -> list[int]:
    """The source each row's text says it came from (its one letter)."""
    found = []
    for tok, seg in zip(tokens_RL, segment_ids_RL):
        text = bytes(tok[seg > 0].astype(np.uint8).tolist()).decode("latin-1")
        kinds = {LETTERS.index(c) for c in text if c in LETTERS}
        assert len(kinds) == 1, text
        found.append(kinds.pop())
    return found


def test_rows_come_from_the_sources_in_proportion_and_are_counted():
    mix = three_sources()
    cfg = DataConfig(seq_len=32, batch_size=8, num_workers=0, shuffle_window=0)
    it = iter(mixture.mixed_batches(mix, TOK, cfg, 8, 0, 1))
    rows, counts = [], np.zeros(3, np.int64)
    for _ in range(6):
        b = next(it)
        assert source_of_rows(b["tokens"], b["segment_ids"]) == b["source"].tolist()
        rows += b["source"].tolist()
        counts += mixture.source_tokens(b["source"], b["segment_ids"], 3)
    # 48 rows of 32 tokens (concat packing fills every row), 3 : 2 : 1.
    assert np.bincount(rows).tolist() == [24, 16, 8]
    assert counts.tolist() == [24 * 32, 16 * 32, 8 * 32]


def test_mixture_resumes_exactly_with_workers_and_keeps_its_counts():
    cfg = DataConfig(seq_len=32, batch_size=8, num_workers=2, shuffle_window=16, seed=5)
    loader = _loader(cfg, three_sources())
    try:
        for _ in range(3):
            batch = next(loader)
            assert set(batch) == {"tokens", "segment_ids", "positions"}  # no source key
        state = loader.get_state()
        counted = loader.source_tokens()
        expected = [np.asarray(next(loader)["tokens"]) for _ in range(4)]
        after = loader.source_tokens()
    finally:
        loader.close()
    assert sum(counted.values()) == 3 * 8 * 32 and list(counted) == list(LETTERS)
    resumed = _loader(cfg, three_sources())
    try:
        resumed.set_state(state)
        assert resumed.source_tokens() == counted
        got = [np.asarray(next(resumed)["tokens"]) for _ in range(4)]
        assert resumed.source_tokens() == after
    finally:
        resumed.close()
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    other = three_sources()
    other.parts[2].signature = ("d",)
    changed = _loader(cfg, other)
    try:
        with pytest.raises(UserError, match="not of this data.mixture's sources"):
            changed.set_state(state)
    finally:
        changed.close()


def test_sources_of_the_config_are_prepared_and_validation_mixes_them(tmp_path):
    (tmp_path / "x.txt").write_text("xx\n" * 40000)  # 120 KB: 8 records
    (tmp_path / "y.jsonl").write_text("".join('{"body": "y%d"}\n' % i for i in range(40)))
    cfg = DataConfig(data_dir=str(tmp_path / "data"), val_fraction=0.25, mixture=(
        MixtureSource(source="local", paths=(str(tmp_path / "x.txt"),), weight=1),
        MixtureSource(source="local", paths=(str(tmp_path / "y.jsonl"),), text_field="body",
                      weight=3)))
    mix = prepare(cfg)
    assert mix.tags == ["x", "y"] and [p.weight for p in mix.parts] == [1, 3]
    assert mix.directory.is_dir() and mix.text_field == "text"
    assert len(mix.train) == sum(len(p.dataset.train) for p in mix.parts)
    texts = [mix.val[i]["text"] for i in range(len(mix.val))]
    assert sum(t.startswith(b"y") for t in texts) == 3 * sum(t.startswith(b"x") for t in texts)
