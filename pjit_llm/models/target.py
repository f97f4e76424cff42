"""The backend a model's program is built for: the one JAX runs on, except while the planner
builds a GPU's program on emulated CPU devices, to analyse it and never to run it
(planning/gpu_program.py). The model's choices per backend read it: the experts' grouped
product (models/expert_products.py) and XLA:CPU's workarounds for bfloat16 sums across
devices (models/moe.py, models/expert_dispatch.py)."""

import jax

_built_for: str | None = None


def target_backend() -> str:
    return _built_for or jax.default_backend()


def build_for(backend: str | None) -> None:
    """Build every later program of this process for `backend` (None: the one JAX runs on)."""
    global _built_for
    _built_for = backend
