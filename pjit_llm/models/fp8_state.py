"""The state delayed fp8 scaling (model.fp8_scaling=delayed) keeps between steps: for each fp8
projection of a block, one (3, H) float32 amax history (models/fp8.py). They are nnx Variables
of their own type, AmaxHistory, and no parameters: stacked with the layers like the weights
(a leading `layers` axis, so pipeline stages hold their own; replicated over the other mesh
axes), saved in checkpoints with them, never seen by the optimizer.

A train step differentiates the loss with respect to the histories too, Flax's
OVERWRITE_WITH_GRADIENT way: their "gradients" are their next values (the multiplies' amaxes
pushed in), which replace them. Where one step uses a history several times, the uses'
gradients must combine by max, not by the sum autodiff takes: gradient accumulation takes the
max of its micro-batches' (training/step.py) and the pipeline gives every iteration its own
copy of the histories, whose gradients it combines by max (parallel/stages.py). (Flax's
fp32_max_grad dtype, whose gradients add by max, does not pass the pipeline's dynamic slices.)
"""

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx


class AmaxHistory(nnx.Variable):
    """A projection's amax history (3, H): rows input, weight, output gradient; newest first."""


# The attribute under which a module holds its DelayedScales (None without delayed scaling).
ATTRIBUTE = "fp8"


class DelayedScales(nnx.Module):
    """The amax histories of a module's fp8 projections, one per projection name (the `name`
    its `matmul` call tags the output with). Modules hold it as their ATTRIBUTE."""

    def __init__(self, names: Iterable[str], length: int):
        for name in names:
            setattr(self, name, AmaxHistory(jnp.zeros((3, length), jnp.float32),
                                            logical_axes=(None, None)))

    def history(self, name: str) -> jax.Array:
        return getattr(self, name).get_value()


def is_history(x) -> bool:
    return isinstance(x, AmaxHistory)


def split_histories(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the rest of `state`: its parameters, its amax histories), merged back by
    `nnx.merge_state`. Without histories the first is `state` as it was."""
    histories, rest = nnx.split_state(state, AmaxHistory, ...)
    return rest, histories


def is_history_path(path: tuple[str, ...]) -> bool:
    """Whether a state path (its keys) leads to an amax history: through a module's
    DelayedScales. For saved trees, which keep no variable types."""
    return ATTRIBUTE in path[:-1]
