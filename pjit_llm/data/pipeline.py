"""The Grain pipeline: this process's share of the records -> shuffle -> tokenize -> pack ->
shuffle rows in a window -> batch, with all of it in worker processes.

Packing `concat` lays documents end to end and cuts rows of seq_len (a long document runs on
into the next row; nothing is dropped); `first_fit` starts every document in a fresh segment
and truncates documents longer than a row. Either way each row carries segment ids (0 marks
padding) and positions that restart with each document piece.

Chat and prompt/completion records (data.format, chat.py) always pack first-fit, so each
conversation stays whole in one row unless it is longer than a row; their `loss_mask` and
`truncated` features are packed alongside the tokens.
"""

import grain
import numpy as np

from pjit_llm.config import DataConfig
from pjit_llm.data import chat
from pjit_llm.data.tokenizer import Tokenizer

KEYS = ("tokens", "segment_ids", "positions")
MASK_KEYS = ("loss_mask", "truncated")  # formats other than text add these


def batch_keys(cfg: DataConfig) -> tuple[str, ...]:
    return KEYS + (MASK_KEYS if cfg.format != "text" else ())


class Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer, field: str, max_len: int | None):
        self.tokenizer, self.field, self.max_len = tokenizer, field, max_len

    def map(self, record):
        text = record[self.field]
        ids = self.tokenizer.encode(text.decode("utf-8", errors="replace")
                                    if isinstance(text, bytes) else text)
        if self.tokenizer.eos_id is not None:
            ids = np.append(ids, np.int32(self.tokenizer.eos_id))
        return {"tokens": ids[: self.max_len]}


class NotEmpty(grain.transforms.Filter):
    def filter(self, element) -> bool:
        return len(element["tokens"]) > 0


class ToBatch(grain.transforms.Map):
    """Grain's packed feature names -> the model's batch keys, int32."""

    def map(self, element):
        batch = {"tokens": element["tokens"].astype(np.int32),
                 "segment_ids": element["tokens_segment_ids"].astype(np.int32),
                 "positions": element["tokens_positions"].astype(np.int32)}
        for key in MASK_KEYS:
            if key in element:
                batch[key] = element[key].astype(np.int32)
        return batch


def packed_batches(source, tokenizer: Tokenizer, field: str, cfg: DataConfig, local_batch: int,
                   shard_index: int, shard_count: int, *, train: bool,
                   num_workers: int | None = None) -> grain.IterDataset:
    """Batches of `local_batch` packed rows from one shard (every shard_count-th record).

    Training data is shuffled with the seed (a new order each epoch) and repeats forever;
    evaluation data is read once, in order, and its last batch may be short.
    """
    rows = packed_rows(source, tokenizer, field, cfg, local_batch, shard_index, shard_count,
                       train=train, seed=cfg.seed)
    return batched(rows, cfg, local_batch, train=train, num_workers=num_workers)


def packed_rows(source, tokenizer: Tokenizer, field: str, cfg: DataConfig, local_batch: int,
                shard_index: int, shard_count: int, *, train: bool, seed: int) -> grain.IterDataset:
    """One shard's records, shuffled (training) and tokenized, packed into rows of seq_len."""
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if train:
        ds = ds.seed(seed).shuffle().repeat(None)
    first_fit = cfg.packing == "first_fit" or cfg.format != "text"
    if cfg.format == "text":
        ds = ds.map(Tokenize(tokenizer, field, cfg.seq_len if first_fit else None))
        length = {"tokens": cfg.seq_len}
    else:
        ds = ds.map(chat.encoder(tokenizer, cfg.format, cfg.seq_len))
        length = dict.fromkeys(("tokens",) + MASK_KEYS, cfg.seq_len)
    ids = ds.filter(NotEmpty()).to_iter_dataset()
    if not first_fit:
        return grain.experimental.ConcatThenSplitIterDataset(ids, length_struct=length)
    return grain.experimental.FirstFitPackIterDataset(
        ids, length_struct=length, num_packing_bins=local_batch, seed=seed, shuffle_bins=train)


def batched(packed: grain.IterDataset, cfg: DataConfig, local_batch: int, *, train: bool,
            num_workers: int | None = None, to_batch: grain.transforms.Map | None = None
            ) -> grain.IterDataset:
    """Packed rows -> (window-shuffled) batches of the model's keys, made in worker processes."""
    if train and cfg.shuffle_window > 1:
        # Consecutive rows of a long document would otherwise fill whole batches.
        packed = grain.experimental.WindowShuffleIterDataset(
            packed, window_size=cfg.shuffle_window, seed=cfg.seed)
    batches = packed.batch(local_batch, drop_remainder=train).map(to_batch or ToBatch())
    workers = cfg.num_workers if num_workers is None else num_workers
    if workers > 0:
        _allow_absl_in_workers()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return batches


def _allow_absl_in_workers() -> None:
    """Grain's worker processes read absl flags; mark them parsed when no absl app did."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
