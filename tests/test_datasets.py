"""The configured dataset, whichever kind: a single source or a mixture of sources, through
the one entry point that training, the tokenizer command and generation use."""

import pytest

from pjit_llm.config import DataConfig, MixtureSource
from pjit_llm.data import mixture, sources
from pjit_llm.data.datasets import prepare, prepare_shared


def test_each_kind_of_config_gets_its_kind_of_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n" * 8000)  # 48 KB: 3 records, 1 held out
    (tmp_path / "b.txt").write_text("beta\n" * 8000)
    data_dir = str(tmp_path / "data")
    single = DataConfig(source="local", paths=(str(tmp_path / "a.txt"),), data_dir=data_dir)
    one = prepare_shared(single)  # one process: prepared here, no waiting on others
    assert isinstance(one, sources.Dataset) and one.directory == prepare(single).directory
    assert (len(one.train), len(one.val)) == (2, 1)
    mixed = DataConfig(data_dir=data_dir, mixture=(
        MixtureSource(source="local", paths=(str(tmp_path / "a.txt"),), weight=1),
        MixtureSource(source="local", paths=(str(tmp_path / "b.txt"),), weight=2)))
    mix = prepare_shared(mixed)
    assert isinstance(mix, mixture.Mixture) and mix.tags == ["a", "b"]
    assert mix.parts[0].dataset.directory == one.directory  # the same source, prepared once
    with pytest.raises(ValueError, match="datasets.prepare takes a mixture"):
        sources.prepare(mixed)  # never the default source in place of the mixture
