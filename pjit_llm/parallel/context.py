"""Context parallelism: every activation's `length` sharded over the `context` mesh axis.

The rule `length: [context]` gives each device a slice of every sequence through the
embedding, norms, projections, MLP and loss. Attention keeps its queries in that slice and
gathers keys and values over `context` (models/layers.py), masking by each token's place
in its row and its segment id rather than by array order.

Load balance: under a causal mask the last slice of a sequence attends to the most keys. The
step reorders each row so that device i of C holds chunks i and 2C-1-i of 2C equal chunks
(`balanced_order`), applied to tokens, targets, loss weights, positions and segment ids
together; the loss is a sum over tokens, so the order changes nothing but who holds what.
"""

import numpy as np

from pjit_llm.errors import UserError
from pjit_llm.parallel.layout import Layout


def context_shards(layout: Layout) -> int:
    """How many pieces each sequence is cut into (the mesh axes of the `length` rule)."""
    return layout.shards("length")


def balanced_order(length: int, shards: int) -> np.ndarray:
    """The original index of each position of a row reordered for `shards` devices: 2·shards
    chunks, device i holding chunk i then chunk 2·shards-1-i."""
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, length // (2 * shards))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]])
                           for i in range(shards)])


def check_sequence(layout: Layout, seq_len: int, load_balance: bool, loss_chunk: int) -> None:
    """Refuse sequences (or loss chunks) that the context shards cannot split evenly."""
    n = context_shards(layout)
    if n == 1:
        return
    axes = "x".join(f"mesh.{a}" for a in layout.mesh_axes("length"))
    if load_balance and seq_len % (2 * n):
        raise UserError(f"data.seq_len={seq_len} is not divisible by 2 x {axes}={n} (load "
                        f"balancing cuts each sequence into {2 * n} chunks); use a multiple of "
                        f"{2 * n}, or train.context_load_balance=false and a multiple of {n}")
    if seq_len % n:
        raise UserError(f"data.seq_len={seq_len} is not divisible by {axes}={n}; use a "
                        f"multiple of {n}")
    if loss_chunk and loss_chunk % n:
        raise UserError(f"model.loss_chunk={loss_chunk} is not divisible by {axes}={n}, which "
                        f"shards every chunk of positions; use a multiple of {n}")
