"""The model placed on devices: what every command that computes with a model assembles.

config -> mesh -> layout -> pipeline stages -> the model config made concrete (vocabulary from
the tokenizer, the attention kernel this backend runs) -> the model's graph and parameter
shapes with their shardings (nothing allocated). Evaluation, generation, export and
conversion need this alone; training (training/build.py) adds the optimizer, the state and
the compiled train step on top. Reads no data and allocates nothing.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pjit_llm import perf
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.models.attention import resolve_attention
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.families import abstract_model, make_model
from pjit_llm.models.layers import padded_vocab
from pjit_llm.models.loss import make_eval_step
from pjit_llm.parallel.context import check_sequence, context_shards
from pjit_llm.parallel.layout import (Layout, check_batch, check_divisible, conversion_mesh,
                                      fit_kv_heads, param_shardings)
from pjit_llm.parallel.mesh import make_mesh
from pjit_llm.parallel.stages import STAGE_AXIS, Pipeline

BYTE_VOCAB = 257  # the byte tokenizer's vocabulary: 256 bytes and the end of a document


@dataclass(frozen=True)
class Placement:
    cfg: Config  # the vocabulary made concrete; model.attention as asked (what a run records)
    model: DecoderConfig  # cfg.model with the attention kernel this backend runs
    mesh: Mesh
    layout: Layout
    pipeline: Pipeline | None  # the schedule of the layers' stages; None without mesh.stage
    balance: int  # context shards the steps reorder each row for (0: no reordering)
    graphdef: nnx.GraphDef
    abstract_params: nnx.State  # shapes, dtypes and logical axes of the parameters

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.layout.sharding(("batch", "length"))

    @cached_property
    def param_shardings(self) -> nnx.State:
        return param_shardings(self.layout, self.abstract_params)

    @cached_property
    def eval_step(self) -> Callable:
        """jitted (params in run order, batch) -> {"loss_sum", "tokens"}: the held-out loss's sums."""
        return jax.jit(make_eval_step(self.graphdef, self.balance),
                       in_shardings=(self.param_shardings, self.batch_sharding),
                       out_shardings=self.layout.replicated())

    def make_params(self, key: jax.Array) -> nnx.State:
        """The parameters `key` gives, in run order; traced inside a jit with out_shardings,
        they are created directly in their shardings. The same key gives the same model on
        every mesh and pipeline schedule."""
        params = nnx.split(make_model(self.model, self.layout, nnx.Rngs(params=key),
                                       self.pipeline))[1]
        return self.pipeline.to_stage_order(params) if self.pipeline else params

    def init_params(self, seed: int = 0) -> nnx.State:
        """Fresh parameters from `seed`, created directly in their shardings (run order)."""
        return jax.jit(self.make_params, out_shardings=self.param_shardings)(jax.random.key(seed))

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len

    @property
    def flops_per_step(self) -> float:
        return perf.flops_per_step(self.model, self.cfg.data.batch_size, self.cfg.data.seq_len)

    def to_model_order(self, tree):
        """Parameters (or a state holding them) with the stacked layers in model order, as
        checkpoints and the generator hold them (a copy under the circular schedule)."""
        return self._reorder(tree, to_model=True)

    def to_run_order(self, tree):
        """The inverse of `to_model_order`: the stacked layers as this run's steps take them."""
        return self._reorder(tree, to_model=False)

    def _reorder(self, tree, to_model: bool):
        if self.pipeline is None or not self.pipeline.circular:
            return tree
        permute = self.pipeline.to_model if to_model else self.pipeline.to_stage_order
        shardings = jax.tree.map(lambda a: a.sharding, tree)
        return jax.jit(permute, out_shardings=shardings)(tree)


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> Config:
    """model.vocab_size=0 made concrete: the tokenizer's, rounded up to a multiple of 128,
    with model.real_vocab_size recording the tokenizer's when that pads it (the padding ids
    are then never predicted). An imported model arrives padded the same way."""
    model = cfg.model
    if not model.vocab_size:
        vocab = padded_vocab(tokenizer_vocab)
        model = dataclasses.replace(model, vocab_size=vocab,
                                    real_vocab_size=0 if vocab == tokenizer_vocab else tokenizer_vocab)
    if model.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer_vocab} tokens; raise it or set 0 to follow the tokenizer")
    return dataclasses.replace(cfg, model=model)


def place(cfg: Config, tokenizer_vocab: int = BYTE_VOCAB,
          devices: Sequence[jax.Device] | None = None, batches: bool = True,
          announce: bool = True) -> Placement:
    """`cfg`'s model on `devices` (default: all). `tokenizer_vocab` sizes a vocabulary the
    config leaves at 0 (default: the byte tokenizer's). `batches` refuses a batch that does
    not split over the mesh (off for conversions, which feed none). `announce` says which
    attention kernel runs."""
    cfg = resolve_vocab(cfg, tokenizer_vocab)
    mesh = make_mesh(cfg.mesh, devices)
    layout = fit_kv_heads(Layout(mesh, cfg.mesh.rules), cfg.model.num_heads, cfg.model.num_kv_heads)
    if batches:
        check_batch(layout, cfg.data.batch_size // cfg.train.grad_accum)
    pipeline = plan_pipeline(cfg, layout, batches)
    context = context_shards(layout)
    balance = context if context > 1 and cfg.train.context_load_balance else 0
    check_sequence(layout, cfg.data.seq_len, bool(balance), cfg.model.loss_chunk)
    model = resolve_attention(cfg.model, cfg.data.seq_len, context, announce)
    graphdef, abstract_params = abstract_model(model, layout, pipeline)
    check_divisible(layout, abstract_params)
    return Placement(cfg, model, mesh, layout, pipeline, balance, graphdef, abstract_params)


def plan_pipeline(cfg: Config, layout: Layout, batches: bool = True) -> Pipeline | None:
    """The pipeline schedule when the mesh has stages (None without), checked against the
    model and, with `batches`, against the batch it must cut into micro-batches."""
    stages = layout.mesh.shape[STAGE_AXIS]
    if stages == 1:
        return None
    if layout.mesh_axes("layers") != (STAGE_AXIS,):
        raise UserError(f"mesh.{STAGE_AXIS}={stages} runs the layers as pipeline stages, which "
                        f"needs mesh.rules.layers=[{STAGE_AXIS}]")
    for rule in dataclasses.fields(cfg.mesh.rules):
        if rule.name in ("layers", "batch"):
            continue
        if STAGE_AXIS in getattr(cfg.mesh.rules, rule.name):
            raise UserError(f"mesh.rules.{rule.name} names {STAGE_AXIS}, which the pipeline "
                            f"stages own: only mesh.rules.layers and mesh.rules.batch may")
    pipeline = Pipeline(stages, cfg.train.microbatches or stages, cfg.train.pipeline_repeats)
    pipeline.check(cfg.model.num_layers, cfg.data.batch_size // cfg.train.grad_accum
                   if batches else None, layout.without(STAGE_AXIS).shards("batch"))
    return pipeline


def place_for_conversion(cfg: Config) -> Placement:
    """`cfg`'s model placed the way import and export place one (parallel.layout's
    conversion_mesh): sharded over as many devices as its width divides."""
    mesh_cfg, devices = conversion_mesh(cfg.model.embed_dim)
    # A conversion computes nothing, so no attention kernel needs choosing.
    model = dataclasses.replace(cfg.model, attention="xla")
    return place(dataclasses.replace(cfg, mesh=mesh_cfg, model=model), devices=devices,
                 batches=False)
