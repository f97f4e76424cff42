"""Every test sees 8 emulated CPU devices; set before JAX initialises a backend."""

import dataclasses
import os
import subprocess
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from pjit_llm.config import load_config  # noqa: E402
from pjit_llm.parallel.axes import AXIS_NAMES  # noqa: E402
from pjit_llm.training.build import Components, build  # noqa: E402

# A model small enough to compile in seconds whose every sharded dimension divides by 8
# (kv heads by 4: the tensor-parallel meshes use tensor <= 4 with grouped-query attention).
TINY = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=8", "model.num_kv_heads=4",
        "model.mlp_dim=128", "model.vocab_size=384", "data.seq_len=32", "data.batch_size=16",
        "optimizer.warmup_steps=1", "train.steps=10"]


def tiny_config(*overrides: str):
    return load_config(None, TINY + list(overrides))


def build_on(cfg, mesh: tuple[int, ...] | None = None) -> Components:
    """The builder's components for `cfg` on a mesh of these sizes (in AXIS_NAMES order) over
    all 8 devices, or on one device when `mesh` is None."""
    sizes = dict(zip(AXIS_NAMES, mesh or (1,) * len(AXIS_NAMES)))
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **sizes))
    return build(cfg, devices=jax.devices()[:1] if mesh is None else None)


def run_cli(*args: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m pjit_llm.train ARGS` in a fresh process (its own JAX, its own devices)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-m", "pjit_llm.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny():
    return tiny_config
