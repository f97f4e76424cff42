"""The configured dataset, whichever kind it is: one source (sources.py) or a weighted mixture
of sources (mixture.py), prepared on first use; with several processes, by process 0 alone;
and the tokenizer that goes with it."""

import jax
from jax.experimental import multihost_utils

from pjit_llm.config import DataConfig
from pjit_llm.data import mixture, sources
from pjit_llm.data.tokenizer import Tokenizer, load_tokenizer


def prepare(cfg: DataConfig) -> sources.Dataset | mixture.Mixture:
    """The dataset of data.mixture if it names sources, else of the single data.source."""
    return mixture.prepare(cfg) if cfg.mixture else sources.prepare(cfg)


def prepare_shared(cfg: DataConfig) -> sources.Dataset | mixture.Mixture:
    """With several processes, process 0 prepares the dataset (once, on shared storage)
    while the others wait, then they open it."""
    if jax.process_count() == 1:
        return prepare(cfg)
    dataset = prepare(cfg) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("pjit_llm dataset prepared")
    return dataset or prepare(cfg)


def open_data(cfg: DataConfig) -> tuple[sources.Dataset | mixture.Mixture, Tokenizer]:
    """(dataset, tokenizer) of the config: the dataset prepared on first use (by process 0
    when there are several), the tokenizer that the model's vocabulary follows."""
    dataset = prepare_shared(cfg)
    return dataset, load_tokenizer(cfg.tokenizer, cfg.tokenizer_path, dataset.directory)
