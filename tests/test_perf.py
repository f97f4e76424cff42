import jax
import pytest

from pjit_llm import perf
from pjit_llm.models.llama import flops as llama_flops
from pjit_llm.models.llama.config import ModelConfig


def test_model_flops_count_every_matrix_multiply():
    cfg = ModelConfig(num_layers=2, embed_dim=64, num_heads=8, num_kv_heads=4, mlp_dim=128,
                      vocab_size=384)
    # q, o: 64x64 each; k, v: 64x32 each; MLP: 3 x 64x128; output projection 64x384.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert llama_flops.matmul_params(cfg) == 2 * per_layer + 64 * 384
    # Attention: scores and weighted sum, 2 x 2 x width x length forward, x3 with the backward
    # pass, halved by the causal mask.
    assert llama_flops.train_flops_per_token(cfg, 32) == 6 * (2 * per_layer + 64 * 384) + 6 * 2 * 64 * 32


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


def test_a_step_that_cannot_fit_is_refused(monkeypatch):
    from pjit_llm.errors import UserError
    from pjit_llm.training.loop import report_compiled
    compiled = jax.jit(lambda a: a * 2).lower(jax.numpy.ones((256, 256))).compile()
    report_compiled(compiled, 0.1, 1e9)  # no limit on CPU: reported, not refused
    monkeypatch.setattr(perf, "device_memory_limit", lambda device: 1024)
    with pytest.raises(UserError, match="needs .* per device but the device has 1 KiB"):
        report_compiled(compiled, 0.1, 1e9)


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, monkeypatch, capsys):
    import io
    import json

    from pjit_llm.metrics import MetricsLog

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    record = {"step": 5, "loss": 2.5, "tokens_per_s": 1000.0}
    plain = MetricsLog(tmp_path, total_steps=10)
    plain.write(record)
    plain.close()
    assert "step 5 | loss 2.5" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdout", Terminal())
    bar = MetricsLog(tmp_path, append=True, total_steps=10)
    bar.write(record)
    assert bar._bar.n == 5 and "loss=2.5" in str(bar._bar)
    bar.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 5]
