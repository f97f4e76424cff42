"""The conversion command in real processes: a refusal in one line, and the memory an import
and an export of a 300 MB model take (near one parameter, not the model)."""

import json
from pathlib import Path

import pytest

from conftest import run_module
from hf_models import LLAMA, write_hf


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    write_hf(tmp_path / "hf", LLAMA)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    result = run_module("pjit_llm.convert", "import", "--hf", "hf", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'hf/config.json'}: architecture Qwen2ForCausalLM is not supported; "
        "the model types read are: gemma3_text, llama, mistral, mixtral, qwen3, qwen3_moe"]
    assert not (tmp_path / "run").exists()


MEASURE = """
import sys
import jax
from pjit_llm import convert
import pjit_llm.interop.hf  # the command imports its libraries lazily: load them before the baseline
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
jax.numpy.zeros(1).block_until_ready()
base = status("VmRSS")
convert.main(sys.argv[1:])
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_conversion_memory_stays_near_one_parameter_not_the_model(tmp_path):
    config = {**LLAMA, "vocab_size": 8000, "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": 6, "num_attention_heads": 16, "num_key_value_heads": 4,
              "tie_word_embeddings": True}
    write_hf(tmp_path / "hf", config)
    size = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    largest = 6 * 1024 * 2816 * 4  # one stacked MLP matrix: all layers of mlp.gate_proj
    assert size > 290e6
    imported = run_module(None, "import", "--hf", "hf", "--out", "run", cwd=tmp_path, code=MEASURE)
    assert imported.returncode == 0, imported.stderr
    exported = run_module(None, "export", "--run", "run", "--out", "out", "--shard-size", "100MB",
                          cwd=tmp_path, code=MEASURE)
    assert exported.returncode == 0, exported.stderr
    import_peak, export_peak = (int(r.stdout.strip().splitlines()[-1]) for r in (imported, exported))
    print(f"model {size / 1e6:.0f} MB, largest stacked parameter {largest / 1e6:.0f} MB; peak "
          f"added by import {import_peak / 1e6:.0f} MB, by export {export_peak / 1e6:.0f} MB")
    # Export never touches a device: the host holds one stacked parameter (read by Orbax)
    # and one layer of it being written, never the model.
    assert export_peak < 0.8 * size
    # Import builds one parameter on the devices (whose memory is the host's on CPU), reading
    # one layer at a time, saves it with Orbax's partial save and drops it before the next:
    # one stacked parameter plus Orbax's buffers, never the model.
    assert import_peak < 0.9 * size
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4

