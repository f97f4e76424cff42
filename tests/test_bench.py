"""The benchmarks run (no timing is asserted: speed lives in BENCHMARKS.md) and report what they
measured consistently: the real step's loss, sharded state sizes, FLOP accounting."""

import json
import os
import subprocess
import sys

import jax
import pytest

from pjit_llm.models.llama import flops as llama_flops
from pjit_llm.models.attention import resolve_attention
from pjit_llm.bench import main as bench_main
from pjit_llm.training.measure import measure
from pjit_llm.errors import UserError


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-m", "pjit_llm.bench", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_step_benchmark_prints_its_table(tmp_path):
    from conftest import TINY
    out = run_bench("--steps", "2", "--warmup", "1", "--emulate-devices", "8", "mesh.data=2",
                    "mesh.fsdp=4", *TINY, "--variant", "model.remat=full model.loss_chunk=8")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "8 x cpu; step times over 2 synchronised steps" in lines
    header = next(i for i, line in enumerate(lines) if "step ms (median)" in line)
    for column in ("params", "tokens/step", "tokens/s/device", "TFLOP/s/device", "MFU",
                   "peak memory", "compile s"):
        assert column in lines[header]
    base, variant = lines[header + 1].split(), lines[header + 2].split()
    assert base[0] == "base" and base[2] == "512"  # 16 x 32 tokens
    assert variant[0] == "model.remat=full" and "n/a" in variant  # no MFU without a known peak

    out = run_bench("--steps", "1", "--warmup", "0", *TINY, "--json", "--profile",
                    str(tmp_path / "trace"))
    assert list((tmp_path / "trace" / "row0").rglob("*.xplane.pb"))  # the timed step, traced
    row = json.loads(out.stdout)  # JSON alone on stdout; the attention line went to stderr
    assert row["variant"] == "base" and row["tokens_per_step"] == 512
    assert "attention: XLA" in out.stderr


def test_step_measurement_is_the_real_sharded_step(tiny):
    cfg = tiny("mesh.data=1", "mesh.fsdp=8")
    row = measure(cfg, steps=2, warmup=1)
    n_params = row["params"]
    assert n_params == llama_flops.matmul_params(cfg.model) + 2 * 64 * 2 + 64  # + the norm scales
    assert row["tokens_per_step"] == 16 * 32 and row["devices"] == 8
    assert 5.0 < row["loss"] < 7.0  # about ln(384) for random tokens: the model really ran
    # FSDP over 8 devices: each holds an eighth of parameters and both Adam moments (4 bytes
    # each), up to the small replicated step counters.
    full = 3 * 4 * n_params
    assert full / 8 <= row["state_bytes_per_device"] <= 1.05 * full / 8
    flops = llama_flops.train_flops_per_token(cfg.model, 32) * 512 / row["step_s"] / 8 / 1e12
    assert row["tflops_per_device"] == pytest.approx(flops)
    assert row["mfu"] is None and row["peak_memory"] > 0


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(UserError, match="--steps must be >= 1"):
        bench_main(["--steps", "0"])
    with pytest.raises(UserError, match="--repeats must be >= 1"):
        bench_main(["save", "--repeats", "0"])


def test_data_and_save_benchmarks_run(tiny, capsys, tmp_path):
    from conftest import TINY
    bench_main(["data", "--workers", "0", "--batches", "2", "--warmup", "1", "--repeats", "1",
                "--json", *TINY])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert rows[0]["workers"] == 0 and rows[0]["tokens_per_s"] > 0
    bench_main(["save", "--repeats", "1", "--dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "async" in out and "sync" in out


def test_cudnn_attention_is_refused_off_gpu_and_auto_falls_back(tiny, capsys):
    assert jax.default_backend() == "cpu"
    cfg = tiny("model.dtype=bfloat16", "model.attention=cudnn").model
    with pytest.raises(UserError, match="model.attention=cudnn cannot be used: it needs a GPU "
                                        "and the backend is cpu; set model.attention=auto"):
        resolve_attention(cfg, 32)
    resolved = resolve_attention(tiny("model.dtype=bfloat16").model, 32)
    assert resolved.attention == "xla"
    assert "attention: XLA (cuDNN flash attention not used: it needs a GPU" in capsys.readouterr().out
