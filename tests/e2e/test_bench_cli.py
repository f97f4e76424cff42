"""The step benchmark's table through the real command on 8 emulated devices, with variant
rows side by side, a pipeline schedule among them (no timing is asserted: speed lives in
BENCHMARKS.md)."""

from conftest import TINY, run_module


def test_step_benchmark_prints_its_table():
    out = run_module("pjit_llm.bench", "--steps", "2", "--warmup", "1", "--emulate-devices",
                     "8", "mesh.data=2", "mesh.fsdp=4", *TINY, "--variant",
                     "mesh.fsdp=2 mesh.stage=2 train.microbatches=4 train.pipeline_repeats=2 "
                     "model.num_layers=4", "--variant",
                     "model.matmul=fp8 model.fp8_scaling=delayed")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "8 x cpu; step times over 2 synchronised steps" in lines
    header = next(i for i, line in enumerate(lines) if "step ms (median)" in line)
    # MFU counts model FLOPs against the bf16 peak, fp8 rows included
    for column in ("params", "tokens/step", "tokens/s/device", "TFLOP/s/device", "MFU (bf16 peak)",
                   "peak memory", "compile s", "pipeline", "vs base"):
        assert column in lines[header]
    base = lines[header + 1].split()
    assert base[0] == "base" and base[2] == "512"  # 16 x 32 tokens
    assert " - " in lines[header + 1] and "1.00x" in lines[header + 1]  # no stages in the base
    assert "S=2 M=4 R=2, bubble 11%" in lines[header + 2]  # (S-1)/(MR+S-1)
    assert "n/a" in base  # no MFU without a known peak
    delayed = lines[header + 3].split()
    assert delayed[:2] == ["model.matmul=fp8", "model.fp8_scaling=delayed"]
    assert delayed[2] == base[1] and delayed[3] == "512"  # the amax histories are not counted
