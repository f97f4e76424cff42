"""Weighted data mixtures: several sources (local files, TFDS, the built-in corpus), each
batch drawn from them in proportion to their weights.

Each source goes through its own seeded shuffle, tokenizer, packer (pipeline.packed_rows)
and window shuffle of rows; Grain's `IterDataset.mix` then interleaves the packed rows by
weight, deterministically and evenly, so the weights are shares of rows, that is of tokens
(exact with concat packing; first_fit rows carry some padding), in every batch and not only
on average. The rows are then batched as a single source's are.
The mixed iterator's state holds every source's position and the interleaving index, so
resuming is exact, worker processes included. Every row carries the index of its source,
which the loader counts (`source_tokens`) and strips before the batch reaches the model.

Validation interleaves the sources' held-out records by the same weights (Grain's
`MapDataset.mix`, read once, in order).
"""

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from pjit_llm.config import DataConfig
from pjit_llm.data import sources
from pjit_llm.data.pipeline import ToBatch, batched, packed_rows
from pjit_llm.data.tokenizer import Tokenizer
from pjit_llm.errors import UserError

# The keys a mixture entry shares with the single-source data settings.
SOURCE_KEYS = ("source", "paths", "text_field", "name", "train_split", "val_split")


@dataclass
class Part:
    tag: str  # the label in metrics
    weight: float
    dataset: sources.Dataset
    signature: tuple  # what fixes this source's records: a saved position refers to them


@dataclass
class Mixture:
    """A dataset of several weighted parts, with the attributes of sources.Dataset: `train`
    (all training records, one source after another), `val` (the held-out records mixed by
    weight) and `directory` (a folder of its own, for a SentencePiece model trained on it)."""

    parts: list[Part]
    train: object
    val: object
    directory: Path
    text_field: str = "text"

    @property
    def tags(self) -> list[str]:
        return [p.tag for p in self.parts]

    @property
    def signature(self) -> list:
        return [list(p.signature) for p in self.parts]


def prepare(cfg: DataConfig) -> Mixture:
    """Each source of data.mixture prepared (sources.prepare), then mixed."""
    parts = []
    for i, entry in enumerate(cfg.mixture):
        keys = {key: getattr(entry, key) for key in SOURCE_KEYS}
        one = dataclasses.replace(cfg, mixture=(), **keys)
        try:
            dataset = sources.prepare(one)
        except UserError as e:  # name the key where the user wrote it
            message = str(e)
            for key in SOURCE_KEYS:
                message = message.replace(f"data.{key}", f"data.mixture[{i}].{key}")
            if message == str(e):
                message = f"data.mixture[{i}] ({entry.tag}): {message}"
            raise UserError(message) from None
        signature = (entry.tag, *(list(v) if isinstance(v, tuple) else v for v in keys.values()))
        parts.append(Part(entry.tag, entry.weight, dataset, signature))
    as_text = [grain.MapDataset.source(p.dataset.train).map(AsText(p.dataset.text_field))
               for p in parts]
    val = [grain.MapDataset.source(p.dataset.val).map(AsText(p.dataset.text_field))
           for p in parts]
    if min(len(v) for v in val) == 0:
        empty = next(p.tag for p, v in zip(parts, val) if not len(v))
        raise UserError(f"mixture source {empty!r} has no validation records; raise "
                        "data.val_fraction or give it a val_split")
    return Mixture(parts, grain.MapDataset.concatenate(as_text),
                   grain.MapDataset.mix(val, [p.weight for p in parts]),
                   _directory(cfg, parts))


def _directory(cfg: DataConfig, parts: list[Part]) -> Path:
    from tensorflow_datasets.core import constants
    blob = json.dumps([str(p.dataset.directory) for p in parts]).encode()
    root = Path(cfg.data_dir or constants.get_default_data_dir()).expanduser()
    directory = root / "pjit_llm_mixtures" / ("m" + hashlib.sha256(blob).hexdigest()[:16])
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def mixed_batches(mixture: Mixture, tokenizer: Tokenizer, cfg: DataConfig, local_batch: int,
                  shard_index: int, shard_count: int,
                  num_workers: int | None = None) -> grain.IterDataset:
    """Training batches of one shard drawn from every source by weight; each batch also holds
    `source`, the index of each row's source."""
    rows = []
    for k, part in enumerate(mixture.parts):
        # A seed per source from its label: adding a source leaves the others' orders alone.
        seed = (cfg.seed + zlib.crc32(part.tag.encode())) % 2**31
        packed = packed_rows(part.dataset.train, tokenizer, part.dataset.text_field, cfg,
                             local_batch, shard_index, shard_count, train=True, seed=seed)
        if cfg.shuffle_window > 1:  # before mixing, so that every batch keeps the proportions
            packed = grain.experimental.WindowShuffleIterDataset(
                packed, window_size=cfg.shuffle_window, seed=seed)
        rows.append(packed.map(TagSource(k)))
    mixed = grain.IterDataset.mix(rows, [p.weight for p in mixture.parts])
    return batched(mixed, dataclasses.replace(cfg, shuffle_window=0), local_batch, train=True,
                   num_workers=num_workers, to_batch=ToBatchWithSource())


def source_tokens(source_R: np.ndarray, segment_ids_RL: np.ndarray, count: int) -> np.ndarray:
    """Tokens (padding excluded) each of `count` sources gave to these rows."""
    return np.bincount(source_R, weights=np.count_nonzero(segment_ids_RL, axis=1),
                       minlength=count).astype(np.int64)


class AsText(grain.transforms.Map):
    """A record of any source as {"text": its text field}."""

    def __init__(self, field: str):
        self.field = field

    def map(self, record):
        return {"text": record[self.field]}


class TagSource(grain.transforms.Map):
    def __init__(self, index: int):
        self.index = index

    def map(self, element):
        return {**element, "source": np.int32(self.index)}


class ToBatchWithSource(ToBatch):
    def map(self, element):
        return {**super().map(element), "source": element["source"].astype(np.int32)}
