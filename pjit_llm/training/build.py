"""The training builder: the placed model (placement.py) plus what training adds to it.

placement -> optimizer and schedule -> state plan (shapes, dtypes and shardings; nothing
allocated) -> the jitted train step. Training and the step benchmarks build through `build`;
evaluation, generation and export need only the placement. `build` reads no data and
allocates nothing (`Components.init_state` does, when asked); jitted steps compile on first use.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from pjit_llm.config import Config
from pjit_llm.placement import BYTE_VOCAB, Placement, place
from pjit_llm.training.optim import make_optimizer, make_schedule
from pjit_llm.training.step import TrainState, compile_train_step, plan_state, trainable


@dataclass(frozen=True)
class Components(Placement):
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    abstract_state: TrainState  # shapes and dtypes carrying their shardings: a restore target
    shardings: TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state

    def init_state(self, seed: int | None = None) -> TrainState:
        """A fresh state, created directly in its shardings (default seed: train.seed)."""
        seed = self.cfg.train.seed if seed is None else seed

        def init(key):
            params = self.make_params(key)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.tx.init(trainable(params)))

        return jax.jit(init, out_shardings=self.shardings)(jax.random.key(seed))


def build(cfg: Config, tokenizer_vocab: int = BYTE_VOCAB,
          devices: Sequence[jax.Device] | None = None, batches: bool = True,
          announce: bool = True) -> Components:
    """Assemble a training run from `cfg` on `devices` (default: all); the arguments are
    `place`'s."""
    placed = place(cfg, tokenizer_vocab, devices, batches, announce)
    cfg = placed.cfg
    schedule = make_schedule(cfg.optimizer, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    abstract_state, shardings = plan_state(placed.abstract_params, placed.layout, tx)
    train_step = compile_train_step(placed.graphdef, tx, schedule, cfg.train.grad_accum,
                                    placed.layout, shardings,
                                    skip_nonfinite=cfg.train.max_bad_steps > 0,
                                    balance=placed.balance)
    fields = {f.name: getattr(placed, f.name) for f in dataclasses.fields(Placement)}
    return Components(**fields, schedule=schedule, tx=tx, abstract_state=abstract_state,
                      shardings=shardings, train_step=train_step)


def check(cfg: Config, devices: Sequence[jax.Device] | None = None) -> None:
    """Refuse what `build` would refuse (mesh, batch split, stages, sequence, attention
    kernel, optimizer), before any data is prepared: the vocabulary, which only the tokenizer
    knows, is the one thing left unchecked (a one-token stand-in here)."""
    build(cfg, tokenizer_vocab=1, devices=devices, announce=False)  # the run says it later
