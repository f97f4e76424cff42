"""FLOP accounting, device peaks and the compiled step's memory."""

import jax
import pytest

from pjit_llm import perf


def test_peak_flops_table_and_override():
    assert perf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert perf.peak_flops("cpu") is None
    assert perf.peak_flops("cpu", 1.5) == 1.5e12



def test_compiled_step_reports_memory_and_flops():
    compiled = jax.jit(lambda a, b: a @ b).lower(jax.numpy.ones((64, 32)), jax.numpy.ones((32, 16))).compile()
    memory = perf.compiled_memory(compiled)
    assert memory["arguments"] == (64 * 32 + 32 * 16) * 4 and memory["outputs"] == 64 * 16 * 4
    assert memory["peak"] >= memory["arguments"] + memory["outputs"] - memory["aliased"]
    assert perf.compiled_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)

