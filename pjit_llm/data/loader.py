"""Train/validation rows from the configured source, and global batches that resume by step.

Batch `step` is a pure function of (seed, step): an epoch-seeded permutation of the rows, so
a resumed run sees exactly the batches an uninterrupted one would. Each process builds only
the rows its devices hold and the global jax.Array is assembled from those pieces.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding

from pjit_llm.config import DataConfig
from pjit_llm.data import builtin
from pjit_llm.data.packing import pack
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.errors import UserError

Rows = dict[str, np.ndarray]


def load_splits(cfg: DataConfig, tokenizer: ByteTokenizer) -> tuple[Rows, Rows]:
    """Packed (train, validation) rows; validation is a fixed share of whole documents."""
    train, val = [], []
    for name, content in builtin.documents():
        ids = np.append(tokenizer.encode(content), tokenizer.eos_id)
        (val if builtin.is_validation(name, cfg.val_fraction) else train).append(ids)
    if not train or not val:
        raise UserError(f"the corpus has {len(train)} training and {len(val)} validation "
                        "documents; both must be non-empty (adjust data.val_fraction)")
    return pack(train, cfg.seq_len), pack(val, cfg.seq_len)


class Batches:
    """Global batches of `global_batch` rows laid out by `sharding` (batch, length)."""

    def __init__(self, rows: Rows, global_batch: int, sharding: NamedSharding,
                 seed: int | None):
        self.rows, self.global_batch, self.sharding, self.seed = rows, global_batch, sharding, seed
        self.num_rows = len(rows["tokens"])
        self.shape = (global_batch, rows["tokens"].shape[1])
        # The rows of the global batch that this process's devices hold: one contiguous range.
        spans = {idx[0].indices(global_batch)[:2]
                 for idx in sharding.addressable_devices_indices_map(self.shape).values()}
        self.start, self.stop = min(s for s, _ in spans), max(e for _, e in spans)
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.num_rows))
        return self._perm[1]

    def local_indices(self, step: int) -> np.ndarray:
        sample = step * self.global_batch + np.arange(self.start, self.stop)
        epoch, pos = np.divmod(sample, self.num_rows)
        if self.seed is None:  # evaluation: the rows in order
            return pos
        return np.array([self._order(e)[p] for e, p in zip(epoch, pos)])

    def __call__(self, step: int) -> dict[str, jax.Array]:
        idx = self.local_indices(step)
        return {k: jax.make_array_from_process_local_data(self.sharding, v[idx], self.shape)
                for k, v in self.rows.items()}
