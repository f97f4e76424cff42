"""The GPU flag defaults in a fresh process: XLA aborts on a flag it does not know."""

from conftest import run_module
from pjit_llm import xla_flags


def test_every_flag_is_known_to_this_xla():
    """XLA aborts the process on an unknown flag; a CPU backend still parses them all."""
    env = {"XLA_FLAGS": xla_flags.merged_flags(""), "JAX_PLATFORMS": "cpu"}
    out = run_module(None, code="import jax; print(jax.numpy.ones(2).sum())", env=env,
                     timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2.0"
