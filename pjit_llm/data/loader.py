"""Global batches: each process feeds the rows of the batch its devices hold.

The records are split into `data.shards` interleaved shards (default: one per process), each
read by its own Grain pipeline; a process reads only its shards and concatenates their rows.
Fixing `data.shards` makes the global batches independent of how many processes read them.
`Loader` assembles global `jax.Array`s sharded over the batch mesh axes with
`jax.make_array_from_process_local_data`; `get_state` / `set_state` resume exactly. With a
mixture (data/mixture.py) it also counts the tokens each source gave, part of its state.
"""

import gc

import jax
import numpy as np
from jax.sharding import NamedSharding

from pjit_llm.config import DataConfig
from pjit_llm.data import mixture
from pjit_llm.data.pipeline import batch_keys, packed_batches
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


def process_shards(cfg: DataConfig, rows: int) -> tuple[list[int], int]:
    """(this process's shard indices, total shards); each shard fills rows / len(shards)."""
    count, index = jax.process_count(), jax.process_index()
    total = cfg.shards or count
    if total % count:
        raise UserError(f"data.shards={total} must be a multiple of the {count} processes")
    mine = list(range(index * total // count, (index + 1) * total // count))
    if rows % len(mine):
        raise UserError(f"each process's {rows} batch rows must split evenly over its "
                        f"{len(mine)} data shards; change data.shards or data.batch_size")
    return mine, total


def _shard_iterators(source, tokenizer, field, cfg, rows, train, num_workers=None):
    shards, total = process_shards(cfg, rows)
    return [iter(packed_batches(source, tokenizer, field, cfg, rows // len(shards), s, total,
                                train=train, num_workers=num_workers)) for s in shards]


class Loader:
    def __init__(self, dataset: Dataset, tokenizer: Tokenizer, cfg: DataConfig,
                 sharding: NamedSharding):
        self.sharding = sharding
        self.shape = (cfg.batch_size, cfg.seq_len)
        self.keys = batch_keys(cfg)
        rows = local_rows(sharding, cfg.batch_size, cfg.seq_len)
        self.mixture = dataset if isinstance(dataset, mixture.Mixture) else None
        if self.mixture:
            shards, total = process_shards(cfg, rows)
            self._iters = [iter(mixture.mixed_batches(dataset, tokenizer, cfg, rows // len(shards),
                                                      s, total)) for s in shards]
            self._tokens = np.zeros(len(dataset.parts), np.int64)
        else:
            self._iters = _shard_iterators(dataset.train, tokenizer, dataset.text_field, cfg,
                                           rows, train=True)

    def __iter__(self):
        return self

    @property
    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batches' shapes, dtypes and sharding, for compiling before reading one."""
        return {k: jax.ShapeDtypeStruct(self.shape, np.int32, sharding=self.sharding)
                for k in self.keys}

    def __next__(self) -> dict[str, jax.Array]:
        parts = [next(it) for it in self._iters]
        local = {k: np.concatenate([p[k] for p in parts]) for k in self.keys}
        if self.mixture:
            self._tokens += mixture.source_tokens(np.concatenate([p["source"] for p in parts]),
                                                  local["segment_ids"], len(self._tokens))
        return to_global(local, self.sharding, self.shape)

    def source_tokens(self) -> dict[str, int]:
        """Tokens each mixture source has given this process's rows so far (resumed runs
        included); empty for a single source."""
        if not self.mixture:
            return {}
        return dict(zip(self.mixture.tags, self._tokens.tolist()))

    def get_state(self) -> dict:
        state = {"shards": [it.get_state() for it in self._iters]}
        if self.mixture:
            state["mixture"] = self.mixture.signature
            state["source_tokens"] = self._tokens.tolist()
        return state

    def set_state(self, state: dict) -> None:
        if len(state["shards"]) != len(self._iters):
            raise UserError(f"the saved data position has {len(state['shards'])} shards for this "
                            f"process, the loader {len(self._iters)}; keep data.shards and the "
                            "process count of the saved run")
        saved = state.get("mixture")
        if self.mixture and saved != self.mixture.signature:
            names = [s[0] for s in saved] if saved else "a single source"
            raise UserError(f"the saved data position is of {names}, not of this data.mixture's "
                            f"sources {self.mixture.tags}; keep the saved run's sources (only "
                            "their weights may change) or use a new train.run_dir")
        if saved and not self.mixture:
            raise UserError(f"the saved data position is of the mixture {[s[0] for s in saved]}; "
                            "keep the saved run's data.mixture or use a new train.run_dir")
        for it, shard_state in zip(self._iters, state["shards"]):
            it.set_state(shard_state)
        if self.mixture:
            self._tokens = np.asarray(state["source_tokens"], np.int64)

    def close(self) -> None:
        """Stop the worker processes. Dropping the iterators now, not at interpreter exit,
        keeps Grain's finalizers from running after its modules are torn down."""
        for it in self._iters:
            it.close()
        self._iters = []
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
    iters = _shard_iterators(dataset.val, tokenizer, dataset.text_field, cfg, rows, train=False,
                             num_workers=0)
    per_shard = rows // len(iters)
    keys = batch_keys(cfg)
    empty = {k: np.zeros((0, cfg.seq_len), np.int32) for k in keys}
    batches, tokens = [], 0
    for _ in range(num_batches):
        parts = []
        for it in iters:
            part = next(it, None) or empty
            pad = per_shard - len(part["tokens"])
            parts.append({k: np.pad(part[k], ((0, pad), (0, 0))) for k in keys})
        local = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        tokens += int(np.count_nonzero(local.get("loss_mask", local["segment_ids"])))
        batches.append(to_global(local, sharding, (cfg.batch_size, cfg.seq_len)))
    if not tokens:
        raise UserError("the validation split has no tokens; add data or raise data.val_fraction")
    return batches
