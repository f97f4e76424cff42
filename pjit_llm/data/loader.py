"""Global batches: each process feeds the rows of the batch its devices hold.

`Loader` wraps the Grain iterator of this process and assembles global `jax.Array`s sharded
over the batch mesh axes with `jax.make_array_from_process_local_data`. Its `get_state` /
`set_state` resume exactly where an uninterrupted run would be.
"""

import gc

import jax
import numpy as np
from jax.sharding import NamedSharding

from pjit_llm.config import DataConfig
from pjit_llm.data.pipeline import packed_batches
from pjit_llm.data.sources import Dataset
from pjit_llm.data.tokenizer import Tokenizer
from pjit_llm.errors import UserError


def local_rows(sharding: NamedSharding, global_batch: int, seq_len: int) -> int:
    """How many rows of the global batch this process's devices hold (a contiguous range)."""
    spans = {idx[0].indices(global_batch)[:2]
             for idx in sharding.addressable_devices_indices_map((global_batch, seq_len)).values()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    if (stop - start) * jax.process_count() != global_batch:
        raise UserError("the batch must be split evenly across processes: place the mesh axes "
                        "of mesh.rules.batch across hosts")
    return stop - start


class Loader:
    def __init__(self, dataset: Dataset, tokenizer: Tokenizer, cfg: DataConfig,
                 sharding: NamedSharding):
        self.sharding = sharding
        self.shape = (cfg.batch_size, cfg.seq_len)
        rows = local_rows(sharding, cfg.batch_size, cfg.seq_len)
        self._dataset = packed_batches(dataset.train, tokenizer, dataset.text_field, cfg, rows,
                                       jax.process_index(), jax.process_count(), train=True)
        self._iter = iter(self._dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return to_global(next(self._iter), self.sharding, self.shape)

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)

    def close(self) -> None:
        """Stop the worker processes. Dropping the iterators now, not at interpreter exit,
        keeps Grain's finalizers from running after its modules are torn down."""
        if self._iter is None:
            return
        self._iter.close()
        self._iter = self._dataset = None
        gc.collect()


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding, shape) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v, shape) for k, v in local.items()}


def eval_batches(dataset: Dataset, tokenizer: Tokenizer, cfg: DataConfig, sharding: NamedSharding,
                 num_batches: int) -> list[dict[str, jax.Array]]:
    """The first `num_batches` batches of validation rows, made once and reused.

    Every process returns the same number of batches (padding rows have segment id 0 and
    count for nothing), so their evaluation collectives always line up.
    """
    rows = local_rows(sharding, cfg.batch_size, cfg.seq_len)
    it = iter(packed_batches(dataset.val, tokenizer, dataset.text_field, cfg, rows,
                             jax.process_index(), jax.process_count(), train=False, num_workers=0))
    batches, tokens = [], 0
    for _ in range(num_batches):
        local = next(it, None)
        if local is None:
            local = {k: np.zeros((0, cfg.seq_len), np.int32)
                     for k in ("tokens", "segment_ids", "positions")}
        tokens += int(np.count_nonzero(local["segment_ids"]))
        pad = rows - len(local["tokens"])
        local = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in local.items()}
        batches.append(to_global(local, sharding, (cfg.batch_size, cfg.seq_len)))
    if not tokens:
        raise UserError("the validation split has no tokens; add data or raise data.val_fraction")
    return batches
