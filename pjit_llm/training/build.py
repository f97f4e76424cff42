"""The builder: everything a run computes with, assembled from a config in one place.

config -> mesh -> layout -> vocabulary (from the tokenizer) -> optimizer and schedule -> state
plan (shapes, dtypes and shardings; nothing allocated) -> the jitted train and eval steps.
Training, evaluation, generation, conversion and the benchmarks all build through `build`,
so they agree on every one of these choices. `build` reads no data and allocates nothing
(`Components.init_state` does, when asked); jitted steps compile on first use. `open_data`
opens the dataset and tokenizer that the vocabulary follows.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pjit_llm import perf
from pjit_llm.config import Config
from pjit_llm.data.tokenizer import ByteTokenizer
from pjit_llm.errors import UserError
from pjit_llm.models.attention import resolve_attention
from pjit_llm.models.llama.config import ModelConfig
from pjit_llm.models.llama.model import padded_vocab
from pjit_llm.parallel.context import check_sequence, context_shards
from pjit_llm.parallel.layout import Layout, check_batch, conversion_mesh, fit_kv_heads
from pjit_llm.parallel.mesh import make_mesh
from pjit_llm.parallel.stages import STAGE_AXIS, Pipeline
from pjit_llm.training.optim import make_optimizer, make_schedule
from pjit_llm.training.step import TrainState, compile_steps, init_state, plan_state


@dataclass(frozen=True)
class Components:
    cfg: Config  # the vocabulary made concrete; model.attention as asked (what a run records)
    model: ModelConfig  # cfg.model with the attention kernel this backend runs
    mesh: Mesh
    layout: Layout
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract_state: TrainState  # shapes and dtypes carrying their shardings: a restore target
    shardings: TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
    eval_step: Callable  # jitted (params, batch) -> {"loss_sum", "tokens"}
    pipeline: Pipeline | None  # the schedule of the layers' stages; None without mesh.stage
    balance: int = 0  # context shards the steps reorder each row for (0: no reordering)

    def to_model_order(self, state):
        """The state (or parameters) with the stacked layers in model order, as checkpoints and
        the generator hold them (a copy under the circular schedule; `state` is kept)."""
        return self._reorder(state, to_model=True)

    def to_run_order(self, state):
        """The inverse of `to_model_order`: the stacked layers as this run's steps take them."""
        return self._reorder(state, to_model=False)

    def _reorder(self, state, to_model: bool):
        if self.pipeline is None or not self.pipeline.circular:
            return state
        permute = self.pipeline.to_model if to_model else self.pipeline.to_stage_order
        shardings = jax.tree.map(lambda a: a.sharding, state)
        return jax.jit(permute, out_shardings=shardings)(state)

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.layout.sharding(("batch", "length"))

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len

    @property
    def flops_per_step(self) -> float:
        return perf.flops_per_step(self.model, self.cfg.data.batch_size, self.cfg.data.seq_len)

    def init_state(self, seed: int | None = None) -> TrainState:
        """A fresh state, created directly in its shardings (default seed: train.seed)."""
        seed = self.cfg.train.seed if seed is None else seed
        return init_state(self.model, self.layout, self.tx, seed, self.pipeline)[1]


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


def build(cfg: Config, tokenizer_vocab: int = ByteTokenizer.vocab_size,
          devices: Sequence[jax.Device] | None = None, batches: bool = True) -> Components:
    """Assemble a run from `cfg` on `devices` (default: all). `tokenizer_vocab` sizes a
    vocabulary the config leaves at 0; without a tokenizer, the byte tokenizer's. `batches`
    refuses a batch that does not split over the mesh (off for conversions, which feed none)."""
    cfg = resolve_vocab(cfg, tokenizer_vocab)
    mesh = make_mesh(cfg.mesh, devices)
    layout = fit_kv_heads(Layout(mesh, cfg.mesh.rules), cfg.model.num_heads, cfg.model.num_kv_heads)
    if batches:
        check_batch(layout, cfg.data.batch_size // cfg.train.grad_accum)
    pipeline = plan_pipeline(cfg, layout, batches)
    context = context_shards(layout)
    balance = context if context > 1 and cfg.train.context_load_balance else 0
    check_sequence(layout, cfg.data.seq_len, bool(balance), cfg.model.loss_chunk)
    schedule = make_schedule(cfg.optimizer, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    model = resolve_attention(cfg.model, cfg.data.seq_len, context)
    graphdef, abstract_state, shardings = plan_state(model, layout, tx, pipeline)
    train_step, eval_step = compile_steps(graphdef, tx, schedule, cfg.train.grad_accum, layout,
                                          shardings, skip_nonfinite=cfg.train.max_bad_steps > 0,
                                          balance=balance)
    return Components(cfg, model, mesh, layout, schedule, tx, graphdef, abstract_state, shardings,
                      train_step, eval_step, pipeline, balance)


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


def conversion_build(cfg: Config) -> Components:
    """`cfg`'s model placed the way import and export place one (parallel.layout's
    conversion_mesh): sharded over as many devices as its width divides."""
    mesh_cfg, devices = conversion_mesh(cfg.model.embed_dim)
    # A conversion computes nothing, so no attention kernel needs choosing.
    model = dataclasses.replace(cfg.model, attention="xla")
    return build(dataclasses.replace(cfg, mesh=mesh_cfg, model=model), devices=devices,
                 batches=False)


def open_data(cfg: Config):
    """(dataset, tokenizer) of the config: the dataset prepared on first use (by process 0
    when there are several), the tokenizer that the model's vocabulary follows."""
    from pjit_llm.data.datasets import prepare_shared  # Grain and TFDS: only runs that read data
    from pjit_llm.data.tokenizer import load_tokenizer

    dataset = prepare_shared(cfg.data)
    return dataset, load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path, dataset.directory)
