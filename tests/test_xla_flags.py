"""The GPU flag defaults: added once, never over the user's own choice. (That this XLA knows
them all: e2e/test_xla_flags_process.py.)"""

from pjit_llm import xla_flags


def test_defaults_fill_in_without_overriding_the_user():
    merged = xla_flags.merged_flags("--xla_gpu_enable_latency_hiding_scheduler=false --foo=1")
    parts = merged.split()
    assert parts[:2] == ["--xla_gpu_enable_latency_hiding_scheduler=false", "--foo=1"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in parts
    assert f"--xla_gpu_all_gather_combine_threshold_bytes={1 << 30}" in parts
    assert xla_flags.merged_flags(merged) == merged  # applying twice adds nothing
    # What the user chose, ours taken out (a benchmark row records it).
    assert xla_flags.beyond_defaults(merged) == "--xla_gpu_enable_latency_hiding_scheduler=false --foo=1"


def test_switched_off_by_the_environment():
    env = {"PJIT_LLM_XLA_DEFAULTS": "0", "XLA_FLAGS": "--a=1"}
    xla_flags.apply_defaults(env)
    assert env["XLA_FLAGS"] == "--a=1"
    env = {}
    xla_flags.apply_defaults(env)
    assert len(env["XLA_FLAGS"].split()) == len(xla_flags.GPU_DEFAULTS)
