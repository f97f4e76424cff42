"""The decoder-only transformer every family shares: embedding, the stacked blocks of the
family (run by a scan, unrolled, or as pipeline stages), the final norm and the vocabulary
projection; the key/value cache and decoding; the parameter layout for a decode loop.

A family's model is `Transformer` with its block class (`block_class`), built from the
shared layers (models/layers.py).
Shapes in names: B batch, L length, D embed, H heads, G kv heads, K head dim, V vocab.
"""

from functools import cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjit_llm.models.attention_kernels import packed_segments, same_segment_mask
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.fp8_state import split_histories
from pjit_llm.models.layers import (REMAT_POLICIES, Axes, kv_heads_axis, mask_padded_vocab, norm,
                                    param, rope_angles)
from pjit_llm.models.matmul import matmul, take_rows
from pjit_llm.models.quantize import Int8Weight
from pjit_llm.parallel.layout import Layout, constrain
from pjit_llm.parallel.stages import STAGE_AXIS, Pipeline, merge_microbatches, split_microbatches


class LayerInputs(NamedTuple):
    """What each layer attends with besides its input: the rotary angles and the mask of the
    global layers and, for a family with sliding-window layers, of its local ones (their own
    rotary base; the mask also hides keys sliding_window or more positions back)."""
    sin: jax.Array
    cos: jax.Array
    mask: object  # None, a (B, 1, L, S) boolean mask, or PackedSegments
    local_sin: jax.Array | None = None
    local_cos: jax.Array | None = None
    local_mask: jax.Array | None = None
    # (B, L) float32: 1 for the real tokens (segment > 0), over which the layers' per-token
    # statistics (a mixture of experts' router) are summed; None: every token.
    real: jax.Array | None = None

    def pick(self, local):
        """(sin, cos, mask) of a local layer where `local` (a bool, or traced in a scan)."""
        if self.local_mask is None or local is False:
            return self.sin, self.cos, self.mask
        if local is True:
            return self.local_sin, self.local_cos, self.local_mask
        return tuple(jnp.where(local, a, b) for a, b in
                     ((self.local_sin, self.sin), (self.local_cos, self.cos),
                      (self.local_mask, self.mask)))


class Transformer(nnx.Module):
    """With `pipeline`, training and evaluation run the layers as pipeline stages along the
    `stage` mesh axis (parallel/stages.py); the stacked layers are then in its stage order.
    Decoding with a cache always runs them one after another. A family's subclass names its
    block: `block_class(cfg, layout, rngs)`, called as
    `block(x_BLD, sin, cos, mask, kv=None, causal=True) -> (x_BLD, kv)`, and where its layers
    are of two kinds, the other's (`dense_block_class`, `dense_layers`): each kind is then
    stacked apart, `blocks` and `dense_blocks`, and the forward pass walks the runs of
    consecutive layers of one kind (`layer_runs`)."""

    block_class: type[nnx.Module]
    # A stack that mixes two kinds of layer (a mixture of experts with dense layers) keeps
    # the layers `dense_layers` marks, of this class, in a second stack, `dense_blocks`.
    dense_block_class: type[nnx.Module] | None = None

    @classmethod
    def dense_layers(cls, cfg: DecoderConfig) -> tuple[bool, ...]:
        """Which layers are `dense_block_class`'s rather than `block_class`'s (none here)."""
        return (False,) * cfg.num_layers

    def __init__(self, cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs,
                 pipeline: Pipeline | None = None, layer_list: bool = False):
        if cfg.vocab_size <= 0:
            raise ValueError("resolve model.vocab_size from the tokenizer before building the model")
        D, V, pd = cfg.embed_dim, cfg.vocab_size, cfg.param_dtype
        self.embed = param(rngs, cfg.init_std, (V, D), ("vocab", "embed"), pd)
        # Inside the layers `stage` belongs to the pipeline (or to the stacked weights alone),
        # so their activations are sharded over the other axes only.
        block_layout = None if layout is None else layout.without(STAGE_AXIS)

        dense = self.dense_layers(cfg)
        self.blocks = _stack(self.block_class, cfg, block_layout, rngs,
                             dense.count(False), layer_list)
        if any(dense):  # only a mixed stack has them: a model without keeps its tree
            self.dense_blocks = _stack(self.dense_block_class, cfg, block_layout, rngs,
                                       dense.count(True), layer_list)
        self.final_norm = norm(cfg, D)
        if not cfg.tie_embeddings:
            self.unembed = param(rngs, cfg.init_std, (D, V), ("embed", "vocab"), pd)
        self.cfg, self.layout, self.pipeline = cfg, layout, pipeline
        self.block_layout = block_layout

    def __call__(self, tokens_BL, segment_ids_BL, positions_BL, slots_BL=None) -> jax.Array:
        """Logits (B, L, V) in the compute dtype."""
        return self.logits(self.hidden(tokens_BL, segment_ids_BL, positions_BL, slots_BL))

    def hidden(self, tokens_BL, segment_ids_BL, positions_BL, slots_BL=None) -> jax.Array:
        """The final normalised hidden states (B, L, D), which `logits` projects onto the
        vocabulary. Tokens attend only within their segment unless model.segment_mask is off.
        `slots_BL`: each token's place in its row when the rows come reordered (context load
        balance); causality then follows the slots, not the array order."""
        return self.hidden_and_stats(tokens_BL, segment_ids_BL, positions_BL, slots_BL)[0]

    def hidden_and_stats(self, tokens_BL, segment_ids_BL, positions_BL, slots_BL=None):
        """(`hidden`, the statistics the layers sow as NNX intermediates, each summed over the
        real tokens: {name: (layers, ...)}, empty for a model whose layers sow none)."""
        x_BLD = self._embed(tokens_BL)
        if self.pipeline is None:
            inputs = self._inputs(segment_ids_BL, positions_BL, slots_BL, self.layout)
            x_BLD, stats = self._run_blocks(x_BLD, inputs, causal=slots_BL is None)
        else:
            x_BLD, stats = self._run_pipeline(x_BLD, segment_ids_BL, positions_BL, slots_BL)
        return self.final_norm(x_BLD), stats

    def _inputs(self, segment_ids_BL, positions_BL, slots_BL, layout: Layout | None) -> LayerInputs:
        """Rotary angles and masks for the layers of this batch (a window measured by each
        token's place in its row, the slots where rows are reordered), and which tokens are
        real (segment > 0), for the router statistics a mixture of experts sums."""
        inputs = self._attention_inputs(segment_ids_BL, positions_BL, slots_BL, layout)
        return inputs._replace(real=(segment_ids_BL > 0).astype(jnp.float32))

    def _attention_inputs(self, segment_ids_BL, positions_BL, slots_BL, layout: Layout | None):
        cfg = self.cfg
        sin, cos = rope_angles(positions_BL, cfg.head_size, cfg.rope_theta, cfg)
        mask_B1LS = self._mask(segment_ids_BL, slots_BL, layout)
        if not any(cfg.local_layers()):
            return LayerInputs(sin, cos, mask_B1LS)
        local_sin, local_cos = rope_angles(positions_BL, cfg.head_size, cfg.rope_local_theta)
        B, L = segment_ids_BL.shape
        place_BL = jnp.broadcast_to(jnp.arange(L), (B, L)) if slots_BL is None else slots_BL
        near_B1LS = constrain(layout, place_BL[:, None, :, None] - place_BL[:, None, None, :]
                              < cfg.sliding_window, ("batch", None, "length", None))
        if mask_B1LS is None:  # global layers get a mask too, so that a scan can pick either
            return LayerInputs(sin, cos, jnp.ones_like(near_B1LS), local_sin, local_cos,
                               near_B1LS)
        return LayerInputs(sin, cos, mask_B1LS, local_sin, local_cos, mask_B1LS & near_B1LS)

    def _mask(self, segment_ids_BL, slots_BL, layout: Layout | None):
        """(B, 1, L, L) or None: same segment (model.segment_mask), and with `slots_BL` key
        slot <= query slot. Its query axis is sharded like the queries (`length`). For cuDNN
        with model.max_segments, the documents' offsets instead (`PackedSegments`)."""
        cfg = self.cfg
        if cfg.segment_mask and cfg.attention == "cudnn" and cfg.max_segments and slots_BL is None:
            return packed_segments(segment_ids_BL, cfg.max_segments)
        mask_B1LS = None
        if cfg.segment_mask:
            mask_B1LS = same_segment_mask(segment_ids_BL)
        if slots_BL is not None:
            causal_B1LS = slots_BL[:, None, :, None] >= slots_BL[:, None, None, :]
            mask_B1LS = causal_B1LS if mask_B1LS is None else mask_B1LS & causal_B1LS
        if mask_B1LS is None:
            return None
        return constrain(layout, mask_B1LS, ("batch", None, "length", None))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        return self.project(x_BLD, self.output_weights())

    def output_weights(self) -> jax.Array:
        """The vocabulary projection (V, D) in the compute dtype, FSDP shards gathered (as for
        every weight), so that a loop over chunks of positions gathers it once."""
        w_VD = self.embed[...] if self.cfg.tie_embeddings else self.unembed[...].T
        if not isinstance(w_VD, Int8Weight):  # int8 values reach matmul as they are
            w_VD = w_VD.astype(self.cfg.dtype)
        return _constrain_table(self.layout, w_VD)

    def project(self, x_BLD: jax.Array, w_VD: jax.Array) -> jax.Array:
        logits_BLV = mask_padded_vocab(matmul("BLD,VD->BLV", x_BLD, w_VD, self.cfg.dtype), self.cfg)
        return constrain(self.layout, logits_BLV, ("batch", "length", "vocab"))

    def decode(self, tokens_BL, positions_BL, cache: tuple[dict, ...]):
        """Logits for new tokens at `positions` (consecutive per row) given the key/value
        cache of the earlier ones, one {"k", "v": (B, S, G, K)} per layer; returns (logits,
        cache). The layers run one after another, each writing only its new entries into its
        own cache buffers, which a decode loop then updates in place. Stacked layers are
        sliced here on every call (a copy of their weights): a loop of decode steps should
        run the model with a layer list (`unstack_layers`) instead."""
        slots_S = jnp.arange(cache[0]["k"].shape[1])
        back_B1LS = positions_BL[:, None, :, None] - slots_S[None, None, None, :]
        mask_B1LS = back_B1LS >= 0
        cfg, layout = self.cfg, self.block_layout
        sin, cos = rope_angles(positions_BL, cfg.head_size, cfg.rope_theta, cfg)
        inputs = LayerInputs(sin, cos, mask_B1LS)
        if any(cfg.local_layers()):  # local layers see the last sliding_window slots
            inputs = LayerInputs(sin, cos, mask_B1LS, *rope_angles(
                positions_BL, cfg.head_size, cfg.rope_local_theta),
                mask_B1LS & (back_B1LS < cfg.sliding_window))
        x_BLD = self._embed(tokens_BL)
        axes = cache_axes(cfg, layout)
        written = []
        for i, (layer_cache, local) in enumerate(zip(cache, cfg.local_layers())):
            k, v = (constrain(layout, layer_cache[n], axes) for n in ("k", "v"))
            sin_i, cos_i, mask_i = inputs.pick(local)
            # what a layer sows (router statistics) serves training only: captured, dropped
            (x_BLD, (k, v)), _ = nnx.capture(self._layer(i), nnx.Intermediate)(
                x_BLD, sin_i, cos_i, mask_i, (k, v, positions_BL[:, 0]))
            written.append({"k": k, "v": v})
        return self.logits(self.final_norm(x_BLD)), tuple(written)

    def _layer(self, i: int) -> nnx.Module:
        stack, j = layer_places(self.dense_layers(self.cfg))[i]
        blocks = getattr(self, stack)
        if isinstance(blocks, nnx.List):
            return blocks[j]
        graphdef, stacked = nnx.split(blocks)
        return nnx.merge(graphdef, jax.tree.map(partial(_index, i=j), stacked))

    def _embed(self, tokens_BL):
        # Gather the table's FSDP shards first (as FSDP does for every weight): a lookup into a
        # table sharded on `embed` cannot produce activations sharded on `batch` efficiently.
        table_VD = _constrain_table(self.layout, self.embed[...])
        x_BLD = take_rows(table_VD, tokens_BL, self.cfg.dtype)
        if self.cfg.scale_embeddings:  # Gemma: the rows times sqrt(width), in their dtype
            x_BLD = x_BLD * jnp.asarray(self.cfg.embed_dim ** 0.5, x_BLD.dtype)
        return constrain(self.layout, x_BLD, ("batch", "length", "embed"))

    def _run_blocks(self, x_BLD, inputs: LayerInputs, stacked=None, local_K=None, causal=True):
        """The layers (all, or the block `stacked` of `blocks` with its flags `local_K`), each
        run of consecutive layers of one kind scanned or unrolled over its slice of its stack;
        each attends with the inputs of its kind (`LayerInputs.pick`). Returns (output, what
        the layers sowed summed over the real tokens, stacked over the layers that sow it)."""
        if stacked is not None:
            return self._run_stack(nnx.graphdef(self.blocks), stacked, local_K, x_BLD, inputs,
                                   causal)
        local_L = np.array(self.cfg.local_layers())
        runs = layer_runs(self.dense_layers(self.cfg))
        per_run = []
        for stack, start, stop, first in runs:
            graphdef, layers = nnx.split(getattr(self, stack))
            if len(runs) > 1:
                layers = jax.tree.map(lambda a: a[start:stop], layers)
            x_BLD, sums = self._run_stack(graphdef, layers, local_L[first:first + stop - start],
                                          x_BLD, inputs, causal)
            per_run.append(sums)
        if len(per_run) == 1:
            return x_BLD, per_run[0]
        names = dict.fromkeys(name for sums in per_run for name in sums)
        return x_BLD, {name: jnp.concatenate([s[name] for s in per_run if name in s])
                       for name in names}

    def _run_stack(self, graphdef, stacked, local_K, x_BLD, inputs: LayerInputs, causal):
        """Layers of one block class (`stacked`, with a leading layers axis, and their flags
        `local_K`), scanned or unrolled; (output, their sown sums stacked over them)."""
        def apply(x, layer):
            layer_state, local = layer
            block = nnx.merge(graphdef, layer_state)
            (y, _), sown = nnx.capture(block, nnx.Intermediate)(x, *inputs.pick(local),
                                                               causal=causal)
            return y, _token_sums(sown, inputs.real)

        if self.cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.cfg.remat],
                                   prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(apply, x_BLD, (stacked, jnp.asarray(local_K)))
        per_layer = []
        for i in range(len(local_K)):
            x_BLD, sums = apply(x_BLD, (jax.tree.map(partial(_index, i=i), stacked), local_K[i]))
            per_layer.append(sums)
        return x_BLD, jax.tree.map(lambda *s: jnp.stack(s), *per_layer)

    def _run_pipeline(self, x_BLD, segment_ids_BL, positions_BL, slots_BL=None):
        """The layers as pipeline stages over micro-batches of the batch: (output, what each
        layer sowed summed over the real tokens of every micro-batch, in model order)."""
        cfg, M = self.cfg, self.pipeline.microbatches
        activation_axes = ("batch", "length", "embed")
        x_MbLD = constrain(self.block_layout, split_microbatches(x_BLD, M),
                            (None, *activation_axes))

        def stage(layers, x_bLD, extras):
            (weights, local_K), histories = layers
            layer_states = nnx.merge_state(weights, histories)
            segment_ids_bL, positions_bL, slots_bL = extras
            inputs = self._inputs(segment_ids_bL, positions_bL, slots_bL, self.block_layout)
            return self._run_blocks(x_bLD, inputs, stacked=layer_states, local_K=local_K,
                                    causal=slots_bL is None)

        extras = (split_microbatches(segment_ids_BL, M), split_microbatches(positions_BL, M),
                  None if slots_BL is None else split_microbatches(slots_BL, M))
        # Each layer's kind travels with its weights, in their (stage) order.
        local_L = np.array(cfg.local_layers())
        if self.pipeline.circular:
            local_L = local_L[self.pipeline.layer_order(cfg.num_layers)]
        # fp8 amax histories are overwritten by their gradients: max over micro-batches.
        weights, histories = split_histories(nnx.split(self.blocks)[1])
        y_MbLD, stats = self.pipeline.run(stage, (weights, jnp.asarray(local_L)), x_MbLD, extras,
                                          self.layout.mesh, self.block_layout.spec(activation_axes),
                                          histories)
        return constrain(self.layout, merge_microbatches(y_MbLD), activation_axes), stats


def _index(a: jax.Array, i: int) -> jax.Array:
    return a[i]


DENSE_STACK = "dense_blocks"  # a mixed stack's layers of `dense_block_class`
STACKS = ("blocks", DENSE_STACK)


def _stack(block_class, cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs, n: int,
           layer_list: bool):
    """`n` blocks of one class stacked over a leading `layers` axis, or with `layer_list` as
    one parameter tree per layer (see `unstack_layers`)."""
    if layer_list:
        return nnx.List([block_class(cfg, layout, rngs) for _ in range(n)])

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make_blocks(rngs: nnx.Rngs) -> nnx.Module:
        return block_class(cfg, layout, rngs)

    return make_blocks(rngs)


def layer_places(dense: tuple[bool, ...]) -> list[tuple[str, int]]:
    """Each layer's stack (DENSE_STACK for the layers `dense` marks, else blocks) and its
    place in that stack."""
    count = dict.fromkeys(STACKS, 0)
    places = []
    for is_dense in dense:
        stack = DENSE_STACK if is_dense else "blocks"
        places.append((stack, count[stack]))
        count[stack] += 1
    return places


def layer_runs(dense: tuple[bool, ...]) -> list[tuple[str, int, int, int]]:
    """The runs of consecutive layers of one kind, in order: (stack, the run's first and end
    places in it, its first layer)."""
    runs = []
    for i, (stack, j) in enumerate(layer_places(dense)):
        if runs and runs[-1][0] == stack:
            runs[-1][2] = j + 1
        else:
            runs.append([stack, j, j + 1, i])
    return [tuple(run) for run in runs]


def _token_sums(sown: nnx.State, real_BL: jax.Array | None) -> dict[str, jax.Array]:
    """{name: value summed over the real tokens} of a layer's intermediates, each sown once
    with (B, L) leading dimensions."""
    sums = {}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sown)):
        name = str(getattr(path[-2], "key", path[-2]))  # sow keeps a tuple of values
        if real_BL is None:
            sums[name] = jnp.sum(value, axis=(0, 1))
        else:
            sums[name] = jnp.einsum("BL...,BL->...", value, real_BL)
    return sums


def _constrain_table(layout: Layout | None, w_VD):
    """A (V, D) table with its FSDP shards gathered; an int8 one with its row scales."""
    if isinstance(w_VD, Int8Weight):
        return Int8Weight(constrain(layout, w_VD.values, ("vocab", None)),
                          constrain(layout, w_VD.scale, ("vocab",)))
    return constrain(layout, w_VD, ("vocab", None))


def cache_axes(cfg: DecoderConfig, layout: Layout | None) -> Axes:
    """The logical axes of one layer's cached keys or values, (B, S, G, K): the heads as
    attention uses them (`kv_heads_axis`)."""
    return ("batch", "length", kv_heads_axis(cfg, layout)[1], "head_dim")


def init_cache(cfg: DecoderConfig, layout: Layout | None, batch: int,
               length: int) -> tuple[dict, ...]:
    """An empty key/value cache for `Transformer.decode`: per layer, `length` slots for each
    of `batch` rows."""
    shape = (batch, length, kv_heads_axis(cfg, layout)[0], cfg.head_size)
    return tuple({"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
                 for _ in range(cfg.num_layers))


@cache
def _layer_splitter(layers: int, sharding: jax.sharding.NamedSharding):
    """One compiled split per stacked sharding (and shape), reused by every `prepare`."""
    one = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.jit(lambda a: tuple(a[i] for i in range(layers)), out_shardings=(one,) * layers)


def unstack_layers(params: nnx.State, donate: bool = False) -> nnx.State:
    """`params` with the stacked layers (each stack) as one tree per layer, the state of
    `Transformer(..., layer_list=True)`: a decode step then reads each layer's weights where
    they lie instead of slicing (copying) them out of the stack every step. Each layer keeps
    the stacked sharding less the layer axis. With `donate`, each stacked array is freed once
    split, so the weights are never held twice."""
    def split(a):
        if isinstance(a.sharding, jax.sharding.NamedSharding):
            layers = _layer_splitter(a.shape[0], a.sharding)(a)
        else:
            layers = tuple(a[i] for i in range(a.shape[0]))
        if donate:
            a.delete()
        return layers

    stacks = {}
    for name in STACKS:
        if name in params:
            leaves, treedef = jax.tree.flatten(params[name])
            per_leaf = [split(a) for a in leaves]
            stacks[name] = {i: treedef.unflatten([t[i] for t in per_leaf])
                            for i in range(len(per_leaf[0]))}
    return nnx.State({**{k: v for k, v in params.items() if k not in stacks}, **stacks})
