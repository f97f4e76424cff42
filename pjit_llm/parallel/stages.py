"""Layer-wise (pipeline) parallelism: the stacked layers cut into stages along the `stage` mesh
axis, micro-batches flowing through them inside the one compiled step.

The schedule is one SPMD program. The batch is cut into M micro-batches; a scan over
M·R + S − 1 iterations runs every stage at once (a vmap over stages whose axis is sharded
over `stage`), and a `ppermute` on `stage` hands each stage's output to the next, the last
stage's back to the first. Stage 0 takes a fresh micro-batch while there are any, then those
that came round from the last stage, R times in all (R = 1 is GPipe; R > 1 the circular
schedule, where each stage holds R non-contiguous blocks of layers and the idle fraction of the
iterations, the bubble, falls from (S−1)/(M+S−1) to (S−1)/(M·R+S−1)). Each iteration keeps
only its input for the backward pass; the stage's layers are recomputed from it. A stage
in its bubble (no micro-batch to work on) computes on zeros.

For the circular schedule the training state holds the stacked layers in stage order (all of
stage 0's blocks, then stage 1's…), so that `stage` shards them in contiguous pieces;
checkpoints hold them in model order (`to_model` / `to_stage_order`), so a run restores onto
any mesh, with or without stages.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pjit_llm.errors import UserError

STAGE_AXIS = "stage"  # the mesh axis the stages lie along (parallel/axes.py)
STACKED = "blocks"  # the model's stacked layers: tree keys under it carry a leading layers axis


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
    """(B, ...) -> (count, B/count, ...), micro-batch j holding rows j, j+count, ... so that a
    batch sharded over devices splits without moving rows between them."""
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """The inverse of `split_microbatches`."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def copies_by_max(tree, count: int):
    """`count` copies of every array of `tree`, stacked on a new leading axis; differentiated,
    the copies' gradients combine by their max instead of their sum."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (count, *a.shape)), tree)


def _copies_fwd(tree, count):
    return copies_by_max(tree, count), None


def _copies_bwd(count, _, g_copies):
    return (jax.tree.map(lambda g: jnp.max(g, axis=0), g_copies),)


copies_by_max.defvjp(_copies_fwd, _copies_bwd)


@dataclass(frozen=True)
class Pipeline:
    stages: int  # S
    microbatches: int  # M
    repeats: int = 1  # R: 1 is GPipe, more is the circular schedule

    @property
    def iterations(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    @property
    def bubble(self) -> float:
        """The share of iterations in which a stage waits: (S−1)/(M·R+S−1)."""
        return (self.stages - 1) / self.iterations

    @property
    def circular(self) -> bool:
        return self.repeats > 1

    def describe(self) -> str:
        kind = f"circular x{self.repeats}" if self.circular else "GPipe"
        return (f"pipeline {kind}: {self.stages} stages, {self.microbatches} micro-batches, "
                f"{self.iterations} iterations, bubble {self.bubble:.1%}")

    def check(self, num_layers: int, batch: int | None, batch_shards: int) -> None:
        """Refuse a schedule the model or the batch (None: none to check) cannot be cut into,
        in one line each."""
        S, M, R = self.stages, self.microbatches, self.repeats
        if num_layers % (S * R):
            raise UserError(f"model.num_layers={num_layers} is not divisible by mesh.stage={S} x "
                            f"train.pipeline_repeats={R}; choose layers, stages and repeats so "
                            "that each stage holds whole blocks of layers")
        if M < S:
            raise UserError(f"train.microbatches={M} is fewer than mesh.stage={S}; use at least "
                            f"{S} micro-batches (more shrink the pipeline bubble)")
        if batch is None:
            return
        if batch % M:
            raise UserError(f"a batch of {batch} sequences (data.batch_size / train.grad_accum) "
                            f"cannot be cut into train.microbatches={M}; use a multiple of {M}")
        if (batch // M) % batch_shards:
            raise UserError(f"a pipeline micro-batch of {batch // M} sequences is not divisible "
                            f"by its {batch_shards} batch shards; use a batch size that is a "
                            f"multiple of {M * batch_shards} x train.grad_accum")

    # -- layer order ---------------------------------------------------------------------------

    def layer_order(self, num_layers: int) -> np.ndarray:
        """The model layer held at each index of the stage-ordered stack. Stage s, block r holds
        the layers that micro-batches pass through on their r-th round: (r·S + s)·K + k."""
        S, R = self.stages, self.repeats
        K = num_layers // (S * R)
        s, r, k = np.meshgrid(np.arange(S), np.arange(R), np.arange(K), indexing="ij")
        return ((r * S + s) * K + k).reshape(-1)

    def to_stage_order(self, tree):
        """Model-ordered stacked layers (every leaf under `blocks`) into stage order."""
        return self._permute(tree, lambda n: self.layer_order(n))

    def to_model(self, tree):
        """The inverse of `to_stage_order`."""
        return self._permute(tree, lambda n: np.argsort(self.layer_order(n)))

    def _permute(self, tree, order: Callable[[int], np.ndarray]):
        if not self.circular:
            return tree

        def permute(path, a):
            if not any(getattr(k, "key", None) == STACKED for k in path):
                return a
            return a[order(a.shape[0])]

        return jax.tree_util.tree_map_with_path(permute, tree)

    # -- the schedule --------------------------------------------------------------------------

    def run(self, stage_fn: Callable, stacked, x_MbLD: jax.Array, extras_M, mesh: Mesh,
            activation_spec: PartitionSpec, overwritten=None) -> tuple[jax.Array, dict]:
        """Run all micro-batches through all layers.

        stage_fn(layers, x, extras) -> (x, stats) runs one block of layers on one micro-batch:
        `layers` is the pair (block of `stacked`, block of `overwritten`), trees with a
        leading axis of K layers; `extras` is the micro-batch's slice of `extras_M` (its
        positions and segment ids, say); `stats` is what the block reports per layer,
        {name: (K, ...)} (a mixture of experts' router statistics; {} for none). `stacked`
        holds every layer in stage order, `x_MbLD` the micro-batches, `activation_spec` how
        one micro-batch's activations are sharded over the other mesh axes. Returns the last
        layer's output for every micro-batch and each layer's stats summed over the
        micro-batches, {name: (layers, ...)} in model order.

        `overwritten` (stacked like `stacked`, or None) is non-negative layer state whose
        gradient is its next value (fp8 amax histories, models/fp8_state.py): each iteration
        reads its own copy, so that differentiated, the uses' gradients combine by max where
        the shared `stacked` adds them up."""
        S, M, R = self.stages, self.microbatches, self.repeats
        stage_S = jnp.arange(S)
        blocks, blocks_max = jax.tree.map(
            lambda a: a.reshape(S, R, a.shape[0] // (S * R), *a.shape[1:]), (stacked, overwritten))
        along = NamedSharding(mesh, PartitionSpec(STAGE_AXIS, *activation_spec))
        banked = NamedSharding(mesh, PartitionSpec(STAGE_AXIS, None, *activation_spec))
        ring = [(s, (s + 1) % S) for s in range(S)]
        by_stage = PartitionSpec(STAGE_AXIS)

        def per_stage(f, out_specs=by_stage):
            """f on each stage's own slice of every argument; the other axes stay with XLA."""
            return jax.shard_map(f, mesh=mesh, in_specs=by_stage, out_specs=out_specs,
                                 axis_names={STAGE_AXIS})

        shift = per_stage(lambda y: jax.lax.ppermute(y, STAGE_AXIS, ring))

        def stage(blocks_R, x, r, extras):
            return stage_fn(jax.tree.map(lambda a: a[r], blocks_R), x, extras)

        # Only the stage's input is saved per iteration; its layers are recomputed backward.
        stages = jax.vmap(jax.checkpoint(stage), spmd_axis_name=STAGE_AXIS)

        def bank_and_take(t, bank_SM, recv_S):
            """Stage 0 banks what came round from the last stage (micro-batch t − S, done with a
            round) and takes micro-batch t mod M (fresh for t < M: the bank starts as the
            input); the other stages take what their predecessor sent."""
            def local(bank_1M, recv_1):
                first = jax.lax.axis_index(STAGE_AXIS) == 0
                slot = (t - S) % M
                arrived = first & (t >= S)
                bank_1M = bank_1M.at[0, slot].set(jnp.where(arrived, recv_1[0], bank_1M[0, slot]))
                return bank_1M, jnp.where(first, bank_1M[:, t % M], recv_1)
            return per_stage(local)(bank_SM, recv_S)

        def iteration(carry, t_and_copy):
            t, blocks_max_t = t_and_copy
            bank_SM, recv_S = carry
            bank_SM, x_S = bank_and_take(t, bank_SM, recv_S)
            micro_S = (t - stage_S) % M  # the micro-batch each stage works on (or a bubble)
            round_S = jnp.clip((t - stage_S) // M, 0, R - 1)
            # A stage in its bubble works on zeros, not on what is left in its input, so that
            # nothing it computes (an amax, say) depends on that.
            working_S = (t >= stage_S) & (t - stage_S < M * R)
            x_S = jnp.where(working_S.reshape(S, *(1,) * (x_S.ndim - 1)), x_S, 0)
            extras_S = jax.tree.map(lambda e: e[micro_S], extras_M)
            y_S, stats_S = stages((blocks, blocks_max_t), x_S, round_S, extras_S)
            y_S = jax.lax.with_sharding_constraint(y_S, along)
            # What a stage in its bubble reports (its zeros' router statistics, say) is not
            # about any micro-batch: it counts for nothing.
            stats_S = jax.tree.map(lambda a: jnp.where(
                working_S.reshape(S, *(1,) * (a.ndim - 1)), a, 0), stats_S)
            return (bank_SM, jax.lax.with_sharding_constraint(shift(y_S), along)), stats_S

        bank_SM = jax.lax.with_sharding_constraint(
            jnp.broadcast_to(x_MbLD, (S, *x_MbLD.shape)), banked)
        recv_S = jax.lax.with_sharding_constraint(jnp.zeros((S, *x_MbLD.shape[1:]), x_MbLD.dtype),
                                                  along)
        T = self.iterations
        (bank_SM, recv_S), stats_TS = jax.lax.scan(iteration, (bank_SM, recv_S),
                                                   (jnp.arange(T), copies_by_max(blocks_max, T)))
        # The last micro-batch's output is still on its way round: bank it too.
        bank_SM, _ = bank_and_take(T, bank_SM, recv_S)

        def from_first(bank_1M):  # stage 0's bank, to every stage (a sum with zeros elsewhere)
            first = jax.lax.axis_index(STAGE_AXIS) == 0
            return jax.lax.psum(jnp.where(first, bank_1M[0], 0), STAGE_AXIS)

        return per_stage(from_first, out_specs=PartitionSpec())(bank_SM), self._layer_sums(stats_TS)

    def _layer_sums(self, stats_TS: dict) -> dict:
        """Each layer's stats summed over the iterations that ran it, {name: (layers, ...)} in
        model order, from {name: (T, S, K, ...)}: the stats of every stage at every iteration
        (zero in its bubble). Iteration t ran stage s's block of round (t − s) // M."""
        S, M, R, T = self.stages, self.microbatches, self.repeats, self.iterations
        t, s = np.arange(T)[:, None], np.arange(S)[None, :]
        round_TSR = np.eye(R, dtype=np.float32)[np.clip((t - s) // M, 0, R - 1)]

        def per_layer(a_TSK):
            a_SRK = jnp.einsum("TSK...,TSR->SRK...", a_TSK, round_TSR)
            a_N = a_SRK.reshape(-1, *a_SRK.shape[3:])  # stage order
            return a_N[np.argsort(self.layer_order(a_N.shape[0]))] if self.circular else a_N

        return jax.tree.map(per_layer, stats_TS)
